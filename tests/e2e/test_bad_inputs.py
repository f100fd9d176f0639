"""Every bad input a user can give, through the real CLI (`python train.py` subprocesses): exit code 2,
exactly one `error:` line on stderr, no Python traceback anywhere, and the completed checkpoints of the
output directory byte for byte as they were.

The cases run in a module fixture, each its own test: in this process through train.main, as
`python train.py` calls it (14 s for 126 cases, against 85 s as processes: each process spent seconds
importing torch), and those in REAL_PROCESSES (and any that changes the environment) as real
`python train.py` processes, whose exit codes and stderr are the processes' own.

The other commands (trainer.generate, trainer.export, launch, bench, the GPU acceptance script) keep the
same contract, through trainer/cli.py's run_command as their `__main__` calls it: those cases run in
this process (torch is imported once, not once per case), launch's with its real train.py children,
and one case of each command as the real `python -m` process."""

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

import train

from tests.helpers import REPO, run_train
from trainer.cli import run_command

CONFIG = ["--config", "configs/debug.yaml"]
RUN = "{run}"  # replaced by the output directory of a completed 2-step run (checkpoints/step-2)

# id -> (command-line arguments after train.py, a part of the expected error line, or a tuple of
# alternatives).
# Arguments without --config get CONFIG and job.output_dir={run} in front (except after RAW).
CASES = {
    # optimizer and schedule
    "lr nan": (["optimizer.lr=nan"], "optimizer.lr=nan must be a positive, finite number"),
    "lr inf": (["optimizer.lr=inf"], "optimizer.lr=inf must be a positive, finite number"),
    "lr negative": (["optimizer.lr=-1"], "optimizer.lr=-1.0 must be a positive"),
    "lr zero": (["optimizer.lr=0"], "optimizer.lr=0.0 must be a positive"),
    "beta1 above 1": (["optimizer.beta1=1.5"], "optimizer.beta1=1.5 must lie in [0, 1)"),
    "beta2 negative": (["optimizer.beta2=-0.1"], "optimizer.beta2=-0.1 must lie in [0, 1)"),
    "beta2 nan": (["optimizer.beta2=nan"], "optimizer.beta2=nan must lie in [0, 1)"),
    "eps negative": (["optimizer.eps=-1"], "optimizer.eps=-1.0 must be a positive, finite number"),
    "eps zero": (["optimizer.eps=0"], "optimizer.eps=0.0 must be a positive"),
    "weight decay negative": (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 must be 0 (off) or a positive"),
    "weight decay inf": (["optimizer.weight_decay=inf"], "optimizer.weight_decay=inf must be 0 (off)"),
    "optimizer name": (["optimizer.name=sgd"], "optimizer.name='sgd' is not one of: adamw"),
    "min lr ratio": (["lr_scheduler.min_lr_ratio=1.5"], "lr_scheduler.min_lr_ratio=1.5 must lie in [0, 1]"),
    "warmup negative": (["lr_scheduler.warmup_steps=-1"], "lr_scheduler.warmup_steps=-1 must be 0 or more"),
    "decay type": (["lr_scheduler.decay_type=cosin"], "lr_scheduler.decay_type='cosin' is not one of: cosine, linear, constant"),
    # training
    "max_norm nan": (["training.max_norm=nan"], "training.max_norm=nan must be 0 (no clipping) or a positive, finite number"),
    "max_norm negative": (["training.max_norm=-1"], "training.max_norm=-1.0 must be 0"),
    "steps zero": (["training.steps=0"], "training.steps=0 must be at least 1"),
    "steps not a number": (["training.steps=many"], "config key 'training.steps': Value 'many' of type 'str' could not be converted to Integer"),
    "local batch zero": (["training.local_batch_size=0"], "training.local_batch_size=0 must be at least 1"),
    "seq_len negative": (["training.seq_len=-1"], "training.seq_len=-1 must be at least 1"),
    "max_bad_steps zero": (["training.max_bad_steps=0"], "training.max_bad_steps=0 must be at least 1"),
    "precision": (["training.mixed_precision_param=fp8"], "training.mixed_precision_param='fp8' is not one of"),
    "global batch": (["training.global_batch_size=10"], "training.global_batch_size=10 is not a multiple of training.local_batch_size x data-parallel size = 4 x 1 = 4"),
    "seq_len over the model": (["training.seq_len=4096"], "training.seq_len=4096 is over the model's maximum sequence length 1024"),
    "chunked loss mode": (["training.chunked_loss=sometimes"], "training.chunked_loss='sometimes' is not one of: auto, always, never"),
    "loss chunk zero": (["training.loss_chunk_tokens=0"], "training.loss_chunk_tokens=0 must be at least 1"),
    "chunked loss with tensor parallelism": (["parallel.tp=2", "training.chunked_loss=always", "--check", "--world-size", "2"],
                                             "training.chunked_loss=always cannot apply here: tensor parallelism computes the loss"),
    # metrics and checkpoints
    "peak tflops zero": (["metrics.peak_tflops=0"], "metrics.peak_tflops=0.0 must be a positive number of TFLOP/s"),
    "peak tflops negative": (["metrics.peak_tflops=-5"], "metrics.peak_tflops=-5.0 must be a positive number"),
    "peak tflops nan": (["metrics.peak_tflops=nan"], "metrics.peak_tflops=nan must be a positive number"),
    "log_every zero": (["metrics.log_every=0"], "metrics.log_every=0 must be at least 1"),
    "progress": (["metrics.progress=sometimes"], "metrics.progress='sometimes' is not one of: auto, on, off"),
    "interval zero": (["checkpoint.interval=0"], "checkpoint.interval=0 must be at least 1"),
    "keep_last negative": (["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1 must be 0 (keep all) or more"),
    "resume_from missing": (["checkpoint.resume_from=/nope/step-3"], "checkpoint.resume_from=/nope/step-3: no such directory"),
    "export dtype": (["export.dtype=float16"], "export.dtype='float16' is not one of: float32, bfloat16"),
    "export peft without adapters": (["export.peft=true"], "export.peft writes an adapter: set adapters.kind to lora or dora"),
    # model
    "dim negative": (["model.dim=-128"], "model.dim=-128 must be at least 1"),
    "ffn zero": (["model.ffn_hidden_dim=0"], "model.ffn_hidden_dim=0 must be at least 1"),
    "dim absurd": (["model.dim=1180591620717411303424"], "model.dim=1180591620717411303424 is over 16,777,216: is it a typo?"),
    "layers zero": (["model.n_layers=0"], "model.n_layers=0 must be at least 1"),
    "heads zero": (["model.n_heads=0"], "model.n_heads=0 must be at least 1"),
    "kv heads not dividing": (["model.n_kv_heads=3"], "model: model n_heads 4 is not a multiple of n_kv_heads 3"),
    "vocab zero": (["model.vocab_size=0"], "model.vocab_size=0 must be at least 1"),
    "vocab below the tokenizer": (["model.vocab_size=100"], "the tokenizer has 259 tokens but the model's vocab_size is 100"),
    "max_seq_len zero": (["model.max_seq_len=0"], "model.max_seq_len=0 must be at least 1"),
    "norm_eps negative": (["model.norm_eps=-1"], "model.norm_eps=-1.0 must be a positive, finite number"),
    "norm_eps zero": (["model.norm_eps=0"], "model.norm_eps=0.0 must be a positive"),
    "rope_theta zero": (["model.rope_theta=0"], "model.rope_theta=0.0 must be a positive, finite number"),
    "rope_theta negative": (["model.rope_theta=-10000"], "model.rope_theta=-10000.0 must be a positive"),
    "rope_theta inf": (["model.rope_theta=inf"], "model.rope_theta=inf must be a positive, finite number"),
    "flavor": (["model.flavor=llama9"], "model.flavor='llama9' is not one of: debug, llama3_2_1b"),
    "init_from missing": (["model.init_from=/nope/model"], "model.init_from: no such file or directory: /nope/model"),
    "model shape of another run": (["model.dim=64", "model.n_heads=2", "model.n_kv_heads=2"],
                                   "model.tok_embeddings.weight has shape (320, 128) but this model's is (320, 64)"),
    # job, parallel
    "seed negative": (["job.seed=-1"], "job.seed=-1 must lie in [0, 2**63)"),
    "output_dir is a file": (["job.output_dir={file}"], "is an existing file, not a directory: choose another job.output_dir"),
    "dp_replicate zero": (["parallel.dp_replicate=0"], "parallel.dp_replicate=0 must be at least 1"),
    "tp zero": (["parallel.tp=0"], "parallel.tp=0 must be at least 1"),
    "dp_shard over the world": (["parallel.dp_shard=2"], "pp x dp_replicate x dp_shard x tp = 1 x 1 x 2 x 1 = 2 do not multiply to the world size 1"),
    "cp zero": (["parallel.cp=0"], "parallel.cp=0 must be at least 1"),
    "cp over the world": (["parallel.cp=2", "--check", "--world-size", "3"],
                          "parallel sizes pp x dp_replicate x cp x tp = 1 x 1 x 2 x 1 = 2 do not divide the world size 3"),
    "seq_len and cp": (["parallel.cp=4", "training.seq_len=100", "--check", "--world-size", "4"],
                       "training.seq_len=100 does not split into 2 x parallel.cp = 8 equal chunks (each cp rank holds two, "
                       "for load balance); use a multiple of 8, e.g. 96"),
    "data attention": (["data.attention=sliding"], "data.attention='sliding' is not one of: auto, causal, document"),
    "pp schedule": (["parallel.pp_schedule=zb"], "parallel.pp_schedule='zb' is not one of: gpipe, 1f1b, interleaved_1f1b"),
    "activation checkpoint mode": (["activation_checkpoint.mode=some"], "activation_checkpoint.mode='some' is not one of"),
    "async tp on cpu": (["parallel.async_tp=true"], "parallel.async_tp needs CUDA, parallel.tp > 1 and compile.enabled=true"),
    # adapters
    "adapter kind": (["adapters.kind=qlora"], "adapters.kind='qlora' is not one of: none, lora, dora"),
    "adapter rank": (["adapters.kind=lora", "adapters.rank=0"], "adapters.rank=0 must be at least 1"),
    "adapter alpha nan": (["adapters.kind=lora", "adapters.alpha=nan"], "adapters.alpha=nan must be a positive, finite number"),
    "adapter dropout": (["adapters.kind=dora", "adapters.dropout=1.0"], "adapters.dropout=1.0 must lie in [0, 1)"),
    "adapter targets": (["adapters.kind=lora", "adapters.targets=[qkv]"], "adapters.targets=['qkv'] matches no linear layer"),
    "4-bit base without adapters": (["adapters.quantize_base=nf4"], "adapters.quantize_base=nf4 quantizes the frozen base under adapters"),
    "4-bit base with tp": (["adapters.kind=lora", "adapters.quantize_base=nf4", "parallel.tp=2"], "with parallel.tp > 1 is not supported"),
    # float8
    "float8 recipe": (["fp8.enabled=true", "fp8.emulate=true", "fp8.recipe=blockwise"],
                      "fp8.recipe='blockwise' is not one of: tensorwise, rowwise, rowwise_with_gw_hp"),
    "float8 all-gather with rowwise": (["fp8.enabled=true", "fp8.emulate=true", "fp8.recipe=rowwise", "fp8.fsdp_float8_all_gather=true"],
                                       "fp8.fsdp_float8_all_gather=true needs fp8.recipe=tensorwise, not rowwise"),
    "float8 size filter with gw_hp": (["fp8.enabled=true", "fp8.emulate=true", "fp8.recipe=rowwise_with_gw_hp", "fp8.auto_filter_small_kn=true"],
                                      "fp8.auto_filter_small_kn=true has no size thresholds for fp8.recipe=rowwise_with_gw_hp"),
    "float8 over a 4-bit base": (["fp8.enabled=true", "fp8.emulate=true", "adapters.kind=lora", "adapters.quantize_base=nf4"],
                                 "fp8.enabled=true with adapters.quantize_base=nf4: a 4-bit base is dequantized for every matmul"),
    "float8 without float8 hardware": (["fp8.enabled=true"], "fp8.enabled=true needs float8 matmuls, on an NVIDIA GPU of compute capability 8.9 or newer"),
    "a mapping for a list": (["eval.sample_prompts={{}}"], "config key 'eval.sample_prompts' takes a list ([a, b]), not a mapping"),
    # quantization-aware training
    "qat scheme": (["qat.scheme=int3"], "qat.scheme='int3' is not one of: none, int8_dynact_int4_weight"),
    "qat over a 4-bit base": (["qat.scheme=int4_weight_only", "adapters.kind=lora", "adapters.quantize_base=nf4"],
                              "qat.scheme=int4_weight_only over adapters.quantize_base=nf4: the base is already stored in 4 bits"),
    "qat with float8 training": (["qat.scheme=float8", "fp8.enabled=true", "fp8.emulate=true"],
                                 "qat.scheme=float8 with fp8.enabled=true: both decide how the same linear layers multiply"),
    "qat group not dividing": (["qat.scheme=int8_dynact_int4_weight", "qat.group_size=48"],
                               "qat.group_size=48 does not divide layers.0.attention.wq's 128 input features"),
    "qat group of one": (["qat.scheme=int4_weight_only", "qat.group_size=1"], "qat.group_size=1 must be at least 2"),
    "qat start negative": (["qat.scheme=float8", "qat.start_step=-1"], "qat.start_step=-1 must be 0"),
    "quantized export name": (["export.quantized=[w4a8]"], "export.quantized: 'w4a8' is not a quantized export (one of: w4a16"),
    "quantized export twice": (["export.quantized=[w4a16,w4a16]"], "export.quantized=['w4a16', 'w4a16'] names an export twice"),
    "quantized eval without validation": (["eval.quantized=[w4a16]"], "eval.quantized=['w4a16'] evaluates at each validation, and eval.every=0"),
    "quantized eval with adapters": (["adapters.kind=lora", "eval.every=5", "eval.split_fraction=0.1", "eval.quantized=[w8a8_fp8]"],
                                     "eval.quantized with adapters.kind=lora: the exports quantize the merged weights"),
    # faults
    "fault injection without the debug flag": (["fault.inject=[hang:rank=0:step=2]"], "set TESSERA_DEBUG_FAULTS=1 in the environment"),
    "fault injection unknown": (["fault.inject=[freeze:rank=0:step=2]"], "fault.inject entry 'freeze:rank=0:step=2': unknown fault 'freeze'"),
    "fault injection missing key": (["fault.inject=[slow:rank=1]"], "slow takes rank, factor (and optionally replica, restart)"),
    "fault injection slow factor": (["fault.inject=[slow:rank=1:factor=0.5]"], "rank and restart must be >= 0, step >= 1, factor > 1"),
    "hang timeout negative": (["fault.hang_timeout_s=-1"], "fault.hang_timeout_s=-1.0 must be 0 (no watchdog) or a number of seconds"),
    "straggler factor below one": (["fault.straggler_factor=0.5"], "must be 0 (not measured) or a factor above 1"),
    "replica id out of range": (["fault.replica_groups=2", "fault.replica_id=2"], "fault.replica_id=2 must be a group of fault.replica_groups=2 (0 to 1)"),
    "replica groups without a lighthouse": (["fault.replica_groups=2"], "fault.replica_groups=2: no torchft Lighthouse: set fault.lighthouse"),
    "replica groups over dp_replicate": (["fault.replica_groups=2", "fault.lighthouse=http://localhost:1", "parallel.dp_replicate=2"],
                                         "parallel.dp_replicate=2 must be 1 with fault.replica_groups"),
    "replica groups with 8-bit moments": (["fault.replica_groups=2", "fault.lighthouse=http://localhost:1", "optimizer.name=adamw_8bit"],
                                          "optimizer.name=adamw_8bit with fault.replica_groups: a recovering group takes a peer's optimizer state"),
    # validation
    "eval without held-out data": (["eval.every=5"], "eval.every=5 needs held-out data: set eval.source"),
    "eval source and fraction": (["eval.source={txt}", "eval.split_fraction=0.1"], "are two ways to get held-out data: give one of them"),
    "eval fraction of one": (["eval.split_fraction=1.0"], "eval.split_fraction=1.0 must lie in [0, 1)"),
    "eval steps zero": (["eval.steps=0"], "eval.steps=0 must be at least 1"),
    "eval source empty": (["eval.every=2", "eval.source={empty}"], "empty.txt: the file is empty; remove it from eval.source"),
    "eval source missing": (["eval.every=2", "eval.source=/nope/held.txt"], "eval.source=/nope/held.txt: no such file"),
    # distillation
    "distill teacher missing": (["distill.teacher=/nope/teacher"], "distill.teacher: no such file or directory: /nope/teacher"),
    "distill vocabulary mismatch": (["distill.teacher={run}/checkpoints/step-2", "model.vocab_size=512"],
                                    "has a vocabulary of 320 tokens and the student 512: teacher and student must share the tokenizer"),
    "kd_ratio above 1": (["distill.kd_ratio=1.5"], "distill.kd_ratio=1.5 must lie in [0, 1]"),
    "kd_ratio negative": (["distill.kd_ratio=-0.1"], "distill.kd_ratio=-0.1 must lie in [0, 1]"),
    "distill temperature zero": (["distill.temperature=0"], "distill.temperature=0.0 must be a positive, finite number"),
    "distill loss": (["distill.loss=jsd"], "distill.loss='jsd' is not one of: forward, reverse"),
    "distill teacher quantize": (["distill.teacher_quantize=int4"], "distill.teacher_quantize='int4' is not one of: none, nf4, bnb_nf4, hqq"),
    "distill with pipeline stages": (["parallel.pp=2", "distill.teacher={run}/checkpoints/step-2", "--check", "--world-size", "2"],
                                     "distill.teacher runs with data parallelism (FSDP2, HSDP) only, not with parallel.pp=2"),
    "distill with context parallelism": (["parallel.cp=2", "distill.teacher={run}/checkpoints/step-2", "--check",
                                          "--world-size", "2"], "parallel.cp=2: the teacher reads each microbatch's inputs"),
    "adapters over a full checkpoint": (["adapters.kind=lora"], "it is from a different model (another run in this output_dir?); start fresh with checkpoint.resume_from=none"),
    # tokenizer and data
    "tokenizer missing": (["tokenizer.kind=auto", "tokenizer.path=/nope/tok.model"], "tokenizer.path: no such file or directory: /nope/tok.model"),
    "tokenizer kind": (["tokenizer.kind=bpe"], "tokenizer.kind='bpe' is not one of"),
    "data missing": (["data.source=/nope/x.jsonl"], "data.source=/nope/x.jsonl: no such file, directory or glob match"),
    "one text file as one document": (["data.source={txt}", "--check"], "or split the text into more documents: data.text_sample_by=paragraph"),
    "data split on a local file": (["data.source={txt}", "data.split=test"], "data.split=test applies to hub:NAME datasets only"),
    "hub config on a local file": (["data.source={txt}", "data.hub_config=en"], "data.hub_config=en applies to hub:NAME datasets only"),
    "empty txt": (["data.source={empty}"], "empty.txt: the file is empty"),
    "binary txt": (["data.source={binary}"], "binary.txt: not text (a NUL byte at offset 0); is it a binary file?"),
    "broken jsonl": (["data.source={broken}"], "broken.jsonl: line 3 is not valid JSON (Expecting ',' delimiter at column 17); fix or remove that record"),
    "garbage parquet": (["data.source={parquet}"], "garbage.parquet: not a Parquet file (it lacks Parquet's PAR1 signature)"),
    "jsonl without the field": (["data.source={nofield}"], "nofield.jsonl: no field 'text' (its fields: body); set data.text_field"),
    "documents too short": (["data.source={short}"], "every document is too short"),
    "mixed formats": (["data.source={mixed}"], "data.source: cannot pick one format"),
    "prefetch negative": (["data.prefetch=-1"], "data.prefetch=-1 must be 0 (no background thread) or more"),
    # prepared shards, streams and mixtures (trainer/data: shards.py, streaming.py, mixture.py)
    "shards of another tokenizer": (["data.source={prepared}", "tokenizer.kind=auto", "tokenizer.path={tok512}"],
                                    "its tokens were made with the byte tokenizer (fingerprint"),
    "shards of other token settings": (["data.source={prepared}", "data.add_bos=false"],
                                       "its tokens were made with data.add_bos=True, this run has data.add_bos=False"),
    "a damaged shard": (["data.source={damaged_shard}"], "shard-00001.tokens does not match its checksum (its bytes changed after it was written); prepare the data again"),
    "an edited manifest": (["data.source={edited_manifest}"], "prepared.json: the manifest does not match its checksum"),
    "streaming prepared shards": (["data.source={prepared}", "data.streaming=true"], "read by memory map (never whole) already"),
    "streaming the stdlib source": (["data.streaming=true"], "data.streaming=true reads files or hub:NAME datasets"),
    "held out by index from a stream": (["data.source={txt}", "data.text_sample_by=line", "data.streaming=true", "eval.every=1",
                                         "eval.split_fraction=0.1"], "a streamed source has not: give eval.source"),
    "mixture weight negative": (["data.sources=[{{source: '{txt}', weight: -1}}]"], "data.sources[0].weight=-1.0 must be a finite number of 0 or more"),
    "mixture weights all zero": (["data.sources=[{{source: '{txt}', weight: 0}}, {{source: '{prepared}', weight: 0}}]"],
                                 "data.sources: every weight is 0"),
    "mixture source missing": (["data.sources=[{{source: '{txt}', weight: 1}}, {{source: /nope/x.jsonl, weight: 1}}]"],
                               "data.sources[1] (x).source=/nope/x.jsonl: no such file"),
    "mixture entry without a source": (["data.sources=[{{weight: 1}}]"], "data.sources[0] has no source"),
    "mixture beside data.source": (["data.source={txt}", "data.sources=[{{source: '{prepared}'}}]"], "and data.sources are both set"),
    "mixture names twice": (["data.sources=[{{source: '{txt}'}}, {{source: '{txt}'}}]"], "more than one source is named 'plain'"),
    "mixture key misspelt": (["data.sources=[{{source: '{txt}', wieght: 1}}]"], "did you mean 'data.sources[0].weight'?"),
    "mixture with a split fraction": (["data.sources=[{{source: '{txt}', text_sample_by: line}}]", "eval.every=1", "eval.split_fraction=0.1"],
                                      "eval.split_fraction=0.1 with data.sources"),
    "profile step past the run": (["training.steps=5", "metrics.profile_steps=[2,9]"],
                                  "metrics.profile_steps=[2, 9] must hold step numbers from 1 to training.steps=5 (not [9])"),
    "cpu_malloc unknown": (["training.cpu_malloc=jemalloc"], "training.cpu_malloc='jemalloc' is not one of: retain, system"),
    "sft over plain text": (["data.task=sft"], "data.task=sft needs records"),
    "hub offline": (["data.source=hub:nobody/nothing"], "data.source=hub:nobody/nothing: could not load it from the Hugging Face Hub (HF_HUB_OFFLINE is set)"),
    # Without HF_HUB_OFFLINE, the Hub's endpoint pointed at a closed local port (tests send nothing off
    # this machine): one failed probe, one line, no half-minute of retries.
    "hub unreachable": (["data.source=hub:nobody/nothing", "ENV:unset-offline"], "data.source=hub:nobody/nothing: the Hugging Face Hub cannot be reached"),
    # checkpoints given as files
    # Each step's manifest (sizes and checksums) names the damaged file before anything reads it.
    "init_from a corrupt checkpoint": (["model.init_from={corrupt}/checkpoints/step-2"], "step-2/.metadata has 7 bytes where the manifest says"),
    "resume from a truncated shard": (["job.output_dir={truncated}"], "truncated/checkpoints/step-2/__0_0.distcp has "),
    "resume from corrupt metadata": (["job.output_dir={corrupt}"], "corrupt/checkpoints/step-2/.metadata has 7 bytes where the manifest says"),
    # the command line itself
    "override form": (["training.steps"], "override 'training.steps' is not of the form dotted.key=value"),
    "unknown key": (["training.stepz=5"], "unknown config key 'training.stepz' in training; did you mean 'training.steps'?"),
    "unknown section": (["optimiser.lr=1"], "did you mean 'optimizer'?"),
    "world size without a plan": (["--world-size", "2"], "--world-size plans for that many ranks with --dry-run, --check or --plan"),
    "format of the stdlib source": (["data.format=parquet"], "data.format=parquet says how to read local files, but data.source=stdlib"),
    "machine flag without --check": (["--for-another-machine"], "--nproc-per-node and --for-another-machine go with --check"),
    "zero ranks per node": (["--check", "--nproc-per-node", "0"], "argument --nproc-per-node: 0 must be at least 1"),
    "dry run for zero ranks": (["--dry-run", "--world-size", "0"], "argument --world-size: 0 must be at least 1"),
    "check for negative ranks": (["--check", "--world-size", "-1"], "argument --world-size: -1 must be at least 1"),
    "dry run and check": (["--dry-run", "--check"], "--dry-run and --check are separate"),
    "unknown flag": (["--config", "configs/debug.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    "no config flag": (["RAW", "--dry-run"], "the following arguments are required: --config"),
    "missing config file": (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    "invalid yaml": (["--config", "{yaml}"], "bad.yaml: not valid YAML"),
    "yaml not a mapping": (["--config", "{list_yaml}"], "list.yaml: the top level must be a mapping of sections"),
}


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "checkpoints" in p.parts):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _files(tmp: Path, run: Path) -> dict[str, Path]:
    """The bad files and directories the cases name."""
    data = tmp / "data"
    data.mkdir()
    (data / "empty.txt").write_bytes(b"")
    (data / "binary.txt").write_bytes(bytes(range(256)) * 20)
    (data / "broken.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    (data / "garbage.parquet").write_bytes(b"\x01\x02garbage" * 100)
    (data / "nofield.jsonl").write_text('{"body": "x"}\n' * 20)
    (data / "short.jsonl").write_text('{"text": "tiny"}\n' * 20)
    (data / "mixed").mkdir()
    (data / "mixed" / "a.txt").write_text("some text\n")
    (data / "mixed" / "b.jsonl").write_text('{"text": "x"}\n')
    (data / "plain.txt").write_text("plain text for a split\n" * 200)
    (tmp / "bad.yaml").write_text("training: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "full_dir").mkdir()
    (tmp / "full_dir" / "x").write_text("x")
    (tmp / "fresh_run").mkdir()  # a run that never saved: its config, no checkpoint
    shutil.copy(run / "config.yaml", tmp / "fresh_run" / "config.yaml")
    corrupt, truncated = tmp / "corrupt", tmp / "truncated"
    shutil.copytree(run, corrupt)
    (corrupt / "checkpoints" / "step-2" / ".metadata").write_bytes(b"garbage")
    shutil.copytree(run, truncated)
    shard = sorted((truncated / "checkpoints" / "step-2").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    from tests.conftest import SHARED_DATA
    from trainer.data.prepare import prepare

    prepared = tmp / "prepared"
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(None, [f"data.source={data / 'plain.txt'}", "data.text_sample_by=line", "tokenizer.kind=byte"], prepared,
                num_proc=1, docs_per_shard=50, dtype=None)
    damaged, edited = tmp / "damaged_shard", tmp / "edited_manifest"
    shutil.copytree(prepared, damaged)
    shard = damaged / "shard-00001.tokens"
    shard.write_bytes(b"\x00\x00" + shard.read_bytes()[2:])
    shutil.copytree(prepared, edited)
    manifest = edited / "prepared.json"
    manifest.write_text(manifest.read_text().replace('"documents": 200', '"documents": 201', 1))
    return {
        "prepared": prepared, "damaged_shard": damaged, "edited_manifest": edited,
        "tok512": SHARED_DATA / "tokenizers/tok512/tok512.model",
        "run": run, "file": tmp / "a_file", "txt": data / "plain.txt", "empty": data / "empty.txt",
        "binary": data / "binary.txt", "broken": data / "broken.jsonl", "parquet": data / "garbage.parquet",
        "nofield": data / "nofield.jsonl", "short": data / "short.jsonl", "mixed": data / "mixed",
        "yaml": tmp / "bad.yaml", "list_yaml": tmp / "list.yaml", "corrupt": corrupt, "truncated": truncated,
        "empty_dir": tmp / "empty_dir", "full_dir": tmp / "full_dir", "fresh_run": tmp / "fresh_run", "tmp": tmp,
    }


# One config error, one command-line error, one checkpoint error as real processes: the exit code and stderr
# are the process's own; the rest run in this process through the same main.
REAL_PROCESSES = {"lr nan", "no config flag", "resume from a truncated shard"}


def _run_case(args: list[str], paths: dict[str, Path], real: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if "ENV:unset-offline" in args:
        args = [a for a in args if a != "ENV:unset-offline"]
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_DATASETS_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens, the connect fails at once
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    if args[0] == "RAW":
        args = args[1:]
    elif "--config" not in args:
        args = [*CONFIG, f"job.output_dir={paths['run']}", *args]
    # The directory whose checkpoints must survive: the one the case trains in.
    out = next((Path(a.split("=", 1)[1]) for a in reversed(args) if a.startswith("job.output_dir=")), paths["run"])
    before = _tree_hash(out) if out.is_dir() else None
    if real or any(env.get(k) != os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")):
        result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=env)
    else:
        result = _in_this_process(args)
    return {"result": result, "unchanged": before is None or _tree_hash(out) == before}


def _in_this_process(args: list[str]) -> SimpleNamespace:
    """train.main(args) with its output captured; an exception that escapes is printed as a traceback,
    which the test then finds. The SIGINT handler a run installs is given back."""
    out, err, handler = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGINT)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.main(args)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    signal.signal(signal.SIGINT, handler)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    run = tmp / "run"
    done = run_train([*CONFIG, "training.steps=2", "checkpoint.interval=2", "export.hf=true", f"job.output_dir={run}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "checkpoints" / "step-2" / ".metadata").is_file()
    return _files(tmp, run)


@pytest.fixture(scope="module")
def outcomes(paths):
    import torch

    with pytest.MonkeyPatch.context() as env:
        env.chdir(REPO)
        # The processes' environment (offline hub), and the threads this process has (no start-up measurement).
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
        return {case: _run_case(args, paths, case in REAL_PROCESSES) for case, (args, _) in CASES.items()}


def test_there_are_many_cases():
    assert len(CASES) >= 60 and REAL_PROCESSES <= set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(outcomes, case):
    outcome, expected = outcomes[case], CASES[case][1]
    result = outcome["result"]
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, output[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert any(e in errors[0] for e in ((expected,) if isinstance(expected, str) else expected)), errors[0]
    assert "Traceback" not in output, output[-3000:]
    assert outcome["unchanged"], "the completed checkpoints changed"


# The other commands: id -> (module, arguments, a part of the expected error line).
COMMAND_CASES = {
    # python -m trainer.generate
    "generate: no arguments": ("trainer.generate", [], "the following arguments are required: path, --prompt"),
    "generate: unknown flag": ("trainer.generate", ["{run}", "--prompt", "x", "--beam", "4"], "unrecognized arguments: --beam 4"),
    "generate: missing path": ("trainer.generate", ["{tmp}/nope", "--prompt", "x"], "nope: no such file or directory; give a run"),
    "generate: not a checkpoint": ("trainer.generate", ["{empty_dir}", "--prompt", "x"], "cannot tell the format of"),
    "generate: a text file": ("trainer.generate", ["{txt}", "--prompt", "x"], "cannot tell the format of"),
    "generate: run without checkpoints": ("trainer.generate", ["{fresh_run}", "--prompt", "x"], "no complete checkpoint"),
    "generate: corrupt checkpoint": ("trainer.generate", ["{corrupt}/checkpoints/step-2", "--prompt", "x"],
                                     "step-2/.metadata has 7 bytes where the manifest says"),
    "generate: truncated checkpoint": ("trainer.generate", ["{truncated}", "--prompt", "x"], "__0_0.distcp has "),
    "generate: export without tokenizer": ("trainer.generate", ["{run}/export/hf", "--prompt", "x"],
                                           "holds no tokenizer: give --tokenizer PATH (--tokenizer byte"),
    "generate: missing tokenizer": ("trainer.generate", ["{run}/export/hf", "--prompt", "x", "--tokenizer", "{tmp}/tok.model"],
                                    "tokenizer.path: no such file or directory"),
    "generate: cuda without a GPU": ("trainer.generate", ["{run}", "--prompt", "x", "--device", "cuda"],
                                     "--device cuda: this machine has no CUDA device; use --device cpu"),
    "generate: not a device": ("trainer.generate", ["{run}", "--prompt", "x", "--device", "gpu0"], "--device 'gpu0' is not a device"),
    "generate: zero new tokens": ("trainer.generate", ["{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    "generate: new tokens not a number": ("trainer.generate", ["{run}", "--prompt", "x", "--max-new-tokens", "many"],
                                          "argument --max-new-tokens: invalid int value: 'many'"),
    "generate: negative temperature": ("trainer.generate", ["{run}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be 0"),
    "generate: top-p zero": ("trainer.generate", ["{run}", "--prompt", "x", "--top-p", "0"], "--top-p 0.0 must lie in (0, 1]"),
    "generate: negative top-k": ("trainer.generate", ["{run}", "--prompt", "x", "--top-k", "-2"], "--top-k -2 must be 0"),
    "generate: chat without a template": ("trainer.generate", ["{run}", "--prompt", "x", "--chat"], "--chat needs a tokenizer with a chat template"),
    "generate: prompt over the model's length": ("trainer.generate", ["{run}", "--prompt", "x" * 1100],
                                                 "the model's maximum sequence length is 1024"),
    # python -m trainer.export
    "export: no arguments": ("trainer.export", [], "the following arguments are required: checkpoint, out_dir"),
    "export: missing step": ("trainer.export", ["{run}/checkpoints/step-9", "{tmp}/e1"], "step-9: no such directory; give a run's"),
    "export: not a checkpoint": ("trainer.export", ["{empty_dir}", "{tmp}/e2"], "is not one of our checkpoints (it has no .metadata)"),
    "export: run without checkpoints": ("trainer.export", ["{fresh_run}", "{tmp}/e3"], "the run has no complete checkpoint"),
    "export: corrupt metadata": ("trainer.export", ["{corrupt}/checkpoints/step-2", "{tmp}/e4"], ".metadata has 7 bytes where the manifest says"),
    "export: truncated shard": ("trainer.export", ["{truncated}", "{tmp}/e5"], "__0_0.distcp has "),
    "export: out is a file": ("trainer.export", ["{run}", "{file}"], "a_file is a file: give a new or empty directory"),
    "export: out holds files": ("trainer.export", ["{run}", "{full_dir}"], "full_dir holds files already"),
    "export: out inside the checkpoints": ("trainer.export", ["{run}", "{run}/checkpoints/step-2/hf"], "where checkpoints live"),
    "export: peft of a full run": ("trainer.export", ["{run}", "{tmp}/e6", "--peft"], "is not an adapter run's checkpoint"),
    "export: dtype": ("trainer.export", ["{run}", "{tmp}/e7", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    "export: peft and quantized": ("trainer.export", ["{run}", "{tmp}/e8", "--peft", "--quantized", "w4a16"],
                                   "--peft and --quantized write different exports: give one of them"),
    "export: quantized name": ("trainer.export", ["{run}", "{tmp}/e9", "--quantized", "w2a16"], "argument --quantized: invalid choice: 'w2a16'"),
    # python -m trainer.data.prepare
    "prepare: no output": ("trainer.data.prepare", ["--config", "configs/debug.yaml"], "the following arguments are required: --output"),
    "prepare: zero processes": ("trainer.data.prepare", ["--output", "{tmp}/p1", "--num-proc", "0"], "argument --num-proc: 0 must be at least 1"),
    "prepare: output not ours": ("trainer.data.prepare", ["--config", "configs/debug.yaml", "--output", "{full_dir}"],
                                 "full_dir is not empty and holds no preparation of ours"),
    "prepare: output prepared": ("trainer.data.prepare", ["--config", "configs/debug.yaml", "--output", "{prepared}"],
                                 "holds prepared data already"),
    "prepare: from prepared": ("trainer.data.prepare", ["--config", "configs/debug.yaml", "--output", "{tmp}/p2", "data.source={prepared}"],
                               "is prepared already: train from it"),
    "prepare: bad data": ("trainer.data.prepare", ["--config", "configs/debug.yaml", "--output", "{tmp}/p3", "data.source={broken}"],
                          "broken.jsonl: line 3 is not valid JSON"),
    # python -m launch
    "launch: no command": ("launch", [], "the following arguments are required: command"),
    "launch: unknown command": ("launch", ["remote"], "argument command: invalid choice: 'remote'"),
    "launch: no config": ("launch", ["local"], "the following arguments are required: --config"),
    "launch: zero replica groups": ("launch", ["local", "--replica-groups", "0", "--config", "configs/debug.yaml"],
                                    "argument --replica-groups: 0 must be at least 1"),
    "launch: negative restarts": ("launch", ["local", "--max-restarts", "-1", "--config", "configs/debug.yaml"],
                                  "argument --max-restarts: -1 must be at least 0"),
    "launch: zero processes": ("launch", ["local", "--nproc", "0", "--config", "configs/debug.yaml"], "argument --nproc: 0 must be at least 1"),
    "launch: processes not a number": ("launch", ["local", "--nproc", "two", "--config", "configs/debug.yaml"], "'two' is not an integer"),
    "launch: missing config file": ("launch", ["local", "--config", "nope.yaml"], "config file not found: nope.yaml"),
    "launch: bad config key": ("launch", ["local", "--config", "configs/debug.yaml", "training.stepz=5"], "did you mean 'training.steps'?"),
    "launch: output-dir of a bad config": ("launch", ["output-dir", "--config", "{yaml}"], "bad.yaml: not valid YAML"),
    "launch: bad layout for the ranks": ("launch", ["local", "--nproc", "3", "--config", "configs/debug.yaml", "parallel.tp=2",
                                                   "job.output_dir={tmp}/l1"], "= 2 do not divide the world size 3"),
    # python -m bench
    "bench: zero processes": ("bench", ["--nproc", "0"], "argument --nproc: 0 must be at least 1"),
    "bench: preset": ("bench", ["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    "bench: method": ("bench", ["--methods", "full,sgd"], "unknown methods or variant groups sgd"),
    "bench: warmup over steps": ("bench", ["--steps", "3", "--warmup", "5"], "--steps 3 must exceed --warmup 5"),
    "bench: zero pairs": ("bench", ["--pairs", "0"], "argument --pairs: 0 must be at least 1"),
    # bash scripts/gpu_acceptance.sh (bench.acceptance)
    "acceptance: step": ("bench.acceptance", ["--only", "gpu-tests,70b"], "unknown steps 70b"),
    "acceptance: budget": ("bench.acceptance", ["--budget", "0"], "argument --budget: 0 must be at least 1"),
    "acceptance: no GPU": ("bench.acceptance", ["--out", "{tmp}/acc"], "no CUDA GPU here; --dry shows the plan"),
}
_MAINS = {"trainer.generate": "trainer.generate", "trainer.export": "trainer.export", "trainer.data.prepare": "trainer.data.prepare",
          "launch": "launch.local",
          "bench": "bench.__main__", "bench.acceptance": "bench.acceptance"}


def test_every_command_has_many_cases():
    assert len(COMMAND_CASES) >= 40 and {m for m, _, _ in COMMAND_CASES.values()} == set(_MAINS)


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_bad_command_input(paths, capfd, case):
    import importlib

    module, args, expected = COMMAND_CASES[case]
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    before = _tree_hash(paths["run"])
    code = run_command(importlib.import_module(_MAINS[module]).main, args)
    out, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (out + err)[-3000:]
    assert len(errors) == 1 and expected in errors[0], err[-3000:]
    assert "Traceback" not in out + err and "usage:" not in err
    assert _tree_hash(paths["run"]) == before, "the completed checkpoints changed"


@pytest.mark.parametrize("module,args,expected", [
    ("trainer.generate", ["--device", "cuda", "--prompt", "x", "{run}"], "this machine has no CUDA device"),
    ("trainer.export", ["{run}", "{file}"], "is a file"),
    ("launch", ["local", "--nproc", "0", "--config", "configs/debug.yaml"], "0 must be at least 1"),
    ("bench", ["--nproc", "0"], "0 must be at least 1"),
], ids=["generate", "export", "launch", "bench"])
def test_the_real_processes_keep_the_contract(paths, module, args, expected):
    """`python -m X` as a user runs it: the exit code and the stderr of the process itself."""
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
