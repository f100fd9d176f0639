"""The config schema: one dataclass per YAML section.

Every key a user may write is a field here; `parse.py` rejects anything else. Fields whose value is one
of a fixed set of words list those words in CHOICES, which `checks.py` enforces (OmegaConf has no Literal
support). Defaults are those of `configs/debug.yaml`, so an empty YAML file is a runnable CPU job.
"""

from dataclasses import dataclass, field

# fp8/ owns its settings: it sits below the trainer and may not import it.
from fp8.config import Float8Config


@dataclass
class JobConfig:
    name: str = "debug"
    # Everything a run writes goes under this directory.
    output_dir: str = "outputs/${job.name}"
    seed: int = 0
    # Deterministic kernels (slower); with it, two runs of the same layout give bitwise-equal losses.
    deterministic: bool = False


@dataclass
class ModelConfig:
    # A named shape from a family's flavors (models/<family>/flavors.py). Empty: "debug", or the shape of `init_from`.
    flavor: str | None = None
    # Weights to start from: a Hugging Face directory (config.json + safetensors) or a llama2.c .bin.
    init_from: str | None = None
    # The model converters, in the order they apply (trainer/converters): float8, qat, adapters. Empty: those
    # their sections turn on (fp8.enabled, qat.scheme, adapters.kind), in that order; a stated list is checked
    # against them.
    converters: list[str] = field(default_factory=list)
    # Overrides of single fields of the flavor.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    ffn_hidden_dim: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    # Mixture-of-experts shapes: experts per layer, experts per token, each expert's hidden size.
    num_experts: int | None = None
    top_k: int | None = None
    moe_hidden_dim: int | None = None


@dataclass
class TokenizerConfig:
    # auto: chosen from `path` (no path: the byte tokenizer).
    kind: str = "auto"
    path: str | None = None


@dataclass
class DataSourceConfig:
    """One source of a mixture (data.sources): its documents and its share of the training windows."""

    # Any form data.source takes: a file, directory, glob, hub:NAME, or a prepared directory.
    source: str = ""
    # The share of windows is weight / (the weights' sum); weights need not sum to 1.
    weight: float = 1.0
    # In metrics (data/tokens/NAME, eval/loss_NAME) and messages; empty: the file's or directory's name.
    name: str = ""
    # Unset: data's own setting.
    format: str | None = None
    text_field: str | None = None
    text_sample_by: str | None = None
    hub_config: str | None = None
    split: str | None = None
    streaming: bool | None = None
    # Held-out documents of this source, in the forms of `source`: validation reports their loss as
    # eval/loss_NAME (eval.every sets when).
    eval_source: str | None = None


@dataclass
class DataConfig:
    # "stdlib" (this Python's own standard library source, present in every install), a local file,
    # directory or glob of .txt/.json/.jsonl/.parquet files, or "hub:NAME" for a Hugging Face Hub dataset.
    source: str = "stdlib"
    format: str = "auto"
    # The field that holds a document's text (json / jsonl / parquet / hub datasets).
    text_field: str = "text"
    # For .txt files: one document per file, per paragraph (blank-line separated) or per line.
    text_sample_by: str = "document"
    hub_config: str | None = None
    split: str = "train"
    # The documents are dealt into this many packed streams; each data-parallel rank reads
    # num_streams / dp of them. Keeping it fixed keeps the data order the same on any number of ranks.
    num_streams: int = 8
    shuffle: bool = True
    add_bos: bool = True
    add_eos: bool = True
    # pretrain: documents of plain text, every token trained. sft: instruction / chat records, only the
    # assistant's tokens trained.
    task: str = "pretrain"
    # sft records: auto (from the fields), alpaca, messages (OpenAI), sharegpt.
    sft_format: str = "auto"
    # sft: skip (and report) records that are malformed instead of stopping at the first one.
    skip_bad_records: bool = False
    # Read local files or a hub:NAME dataset as a stream (trainer/data/streaming.py): nothing is loaded or
    # downloaded whole, at the cost of shuffling only the order of a source's files. A directory made by
    # `python -m trainer.data.prepare` is named in `source` as it is (memory-mapped tokens, no tokenization).
    streaming: bool = False
    # A mixture instead of one source: a list of {source, weight, ...} (DataSourceConfig), each window drawn
    # from one of them by weight (trainer/data/mixture.py); data.source is then left unset. Each source takes
    # data's other settings unless it sets its own.
    sources: list[DataSourceConfig] = field(default_factory=list)
    # Batches made ahead on a background thread while the step computes; 0: on the training thread.
    prefetch: int = 2
    # Attention inside a packed window. causal: every token sees every earlier token of the window, across
    # document boundaries (GPT-style pretraining packing: cheaper, and the model learns to ignore what
    # precedes an end-of-document token). document: each token sees only the earlier tokens of its own
    # document and RoPE positions restart at each document, as if each were alone. auto: document for
    # sft (no example sees another), causal for pretrain.
    attention: str = "auto"


@dataclass
class TrainingConfig:
    steps: int = 200
    # Sequences per forward pass on one rank.
    local_batch_size: int = 8
    # Sequences per optimizer step over all ranks; -1 means local_batch_size x data-parallel size.
    # Anything larger is reached by gradient accumulation.
    global_batch_size: int = -1
    seq_len: int = 256
    # Gradient clipping by global L2 norm; 0 turns it off.
    max_norm: float = 1.0
    # Parameter dtype for compute. auto: bfloat16 on CUDA and on CPUs with bf16 matmuls in hardware (AMX,
    # AVX512-BF16), float32 on other CPUs (measured: docs/performance.md).
    mixed_precision_param: str = "auto"
    # Gradient reduction dtype across data-parallel ranks.
    mixed_precision_reduce: str = "float32"
    # A step whose loss or gradient norm is not finite (nan / inf) is skipped: no optimizer update, no
    # checkpoint. After this many such steps in a row the run stops (exit code 3), keeping the last
    # good checkpoint to resume from.
    max_bad_steps: int = 3
    # The output projection and cross-entropy a chunk of label tokens at a time (the whole batch's
    # logits never exist): auto = wherever it applies (not with tensor parallelism, distillation, or an
    # adapter on the output layer, which keep the plain path); always (an error where it cannot); never.
    chunked_loss: str = "auto"
    loss_chunk_tokens: int = 1024
    # Training on CPU: retain = glibc's malloc keeps freed memory for the next step instead of returning
    # it to the kernel and faulting it in again (trainer/host_memory.py); system = glibc's own thresholds.
    cpu_malloc: str = "retain"


@dataclass
class OptimizerConfig:
    # AdamW by where its two moments live: adamw (float32, 8 bytes per trained parameter), adamw_bf16
    # (bfloat16 with stochastic rounding, 4 bytes), adamw_8bit / adamw_4bit (torchao's block-quantized
    # moments, about 2 and 1 bytes). The update is computed in float32 by all of them.
    name: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # adamw only. auto: fused (CUDA and CPU alike) where torch has the fused kernel, foreach elsewhere.
    implementation: str = "auto"
    # adamw_8bit / adamw_4bit: torch.compile torchao's per-parameter step: auto (on CUDA; on CPU the first
    # step would compile for tens of seconds, so eager there), always, never.
    compile_step: str = "auto"
    # none, or cpu: the optimizer's state and step in host memory, the parameters and gradients on the
    # device (copied over each step; trainer/optimizer_offload.py). adamw / adamw_bf16 only.
    offload: str = "none"


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = 20
    decay_type: str = "cosine"
    # The learning rate at the last step, as a fraction of optimizer.lr.
    min_lr_ratio: float = 0.1


@dataclass
class ParallelConfig:
    # The world is pp x dp_replicate x dp_shard x cp x tp ranks; tp is the innermost (fastest-linked) dimension.
    dp_replicate: int = 1
    # -1: whatever the world size leaves over.
    dp_shard: int = -1
    # Tensor parallel degree: attention heads and MLP columns split over tp ranks, with sequence
    # parallelism for norms and the residual stream.
    tp: int = 1
    # Context parallel degree: every sequence split over cp ranks (load-balanced chunks; keys and values
    # gathered for attention), for sequences longer than one device's activations allow. FSDP shards
    # parameters over dp_shard x cp. training.seq_len must be a multiple of 2 x cp.
    cp: int = 1
    # Expert parallel degree (models with experts): each MoE layer's experts split over ep ranks, tokens sent
    # to their experts' ranks and back (all-to-all). Formed from the data-parallel ranks: ep divides dp_shard,
    # and FSDP shards each rank's experts over the rest of dp_shard x cp.
    ep: int = 1
    # Vocabulary-sharded cross-entropy (with tp > 1): the full logits are never gathered.
    loss_parallel: bool = True
    # Overlap TP communication with matmuls (CUDA with compile.enabled only).
    async_tp: bool = False
    # Pipeline parallel degree: layers split into stages on pp ranks.
    pp: int = 1
    pp_schedule: str = "1f1b"
    # Microbatches per local batch in the pipeline; -1: one per pipeline rank.
    pp_microbatches: int = -1
    # Stages per pipeline rank for interleaved_1f1b (virtual stages).
    pp_stages_per_rank: int = 2
    # FSDP2: free the gathered parameters after each block's forward (default: yes, except the last
    # block, whose parameters backward needs at once).
    fsdp_reshard_after_forward: str = "default"
    # Keep sharded parameters, gradients and optimizer state in CPU memory.
    cpu_offload: bool = False
    # Let the layout planner (docs/planner.md) choose pp, dp_replicate, dp_shard, cp, tp, ep, the pipeline
    # schedule, activation_checkpoint.mode, the local batch (the global batch stays) and fp8.enabled: its best
    # for this world on this machine's GPU (its datasheet), or on CPU by auto_profile (a --calibrate file:
    # every rank must choose alike, which a measurement at each start would not).
    auto: bool = False
    auto_profile: str | None = None


@dataclass
class ActivationCheckpointConfig:
    # none; full (recompute every block); selective_layer (recompute every `every`-th block);
    # selective_op (every block keeps matmul and attention outputs and recomputes the rest).
    mode: str = "none"
    every: int = 2
    # Move what blocks save for backward to host memory during the forward, and back in the backward
    # (every block but the last; pinned memory and a side stream on CUDA; on CPU a correctness path).
    offload: bool = False


@dataclass
class CompileConfig:
    # torch.compile each transformer block (fullgraph), in place so parameter names do not change.
    enabled: bool = False


@dataclass
class AdaptersConfig:
    # none (train every parameter), lora, or dora (LoRA with a learned magnitude per output).
    kind: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank.
    rslora: bool = False
    # Which linear layers get adapters: short names q, k, v, o, gate, up, down, output, or regular
    # expressions over module names (e.g. 'layers\.[0-3]\.attention\.wq').
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    # The frozen base of the adapted layers: none (kept in the training dtype), or 4-bit: nf4 (torchao
    # NF4, shards with FSDP2), bnb_nf4 (bitsandbytes NF4 with double quantization), hqq (HQQ's own
    # quantizer). Quantized block by block as the weights load: no rank holds the whole model in 16/32 bit.
    quantize_base: str = "none"
    # HQQ's group size (consecutive weights per scale / zero point); each adapted layer must hold an even
    # number of groups.
    hqq_group_size: int = 64


@dataclass
class QATConfig:
    """Quantization-aware training (trainer/qat/): the chosen layers compute with their weights (and, for
    the W8A8 schemes, their inputs) rounded as the served model's will be, so that the weights learn to
    sit well on that grid. Checkpoints hold the plain high-precision weights."""

    # none; int8_dynact_int4_weight (int8 activations per token, int4 weights per group);
    # int4_weight_only (W4A16); int8_dynact_int8_weight (W8A8 int8, weights per output row); float8
    # (W8A8 float8 e4m3, activations per token, weights per row).
    scheme: str = "none"
    # Consecutive input features that share one scale, for the per-group schemes (int4 weights).
    group_size: int = 32
    # Train this many steps plainly first, then round from step start_step + 1 on.
    start_step: int = 0
    # Also round the output head / the token embeddings (their weights only) as the blocks' linear layers.
    head: bool = False
    embeddings: bool = False


@dataclass
class EvalConfig:
    """Validation during training: loss and perplexity on held-out documents, and a few samples."""

    # Validate every this many steps, and after the last; 0: never.
    every: int = 0
    # Batches of training.local_batch_size windows per data-parallel rank, the same ones at every validation.
    steps: int = 4
    # Held-out documents, in the forms of data.source (read with data's other settings). Empty: take
    # eval.split_fraction of the training documents, chosen by their index alone and never trained on.
    source: str | None = None
    split_fraction: float = 0.0
    # Prompts continued greedily at each validation, to the console and TensorBoard (text).
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    # Also the held-out loss of the model as each of these quantized exports would serve it (export.quantized's
    # names: w4a16, w8a8_int8, w8a8_fp8), logged as eval/loss_NAME. A QAT run, whose eval/loss is its rounded
    # model's, also logs eval/loss_high_precision (its rounding off).
    quantized: list[str] = field(default_factory=list)


@dataclass
class DistillConfig:
    """Knowledge distillation: the model learns from a frozen teacher's next-token distributions as well
    as from the labels: loss = (1 - kd_ratio) * cross-entropy + kd_ratio * temperature^2 * KL."""

    # The teacher's weights, in any form model.init_from reads; it must share the model's tokenizer. Empty: off.
    teacher: str | None = None
    # Store the teacher's block linears in 4 bits, as adapters.quantize_base does a base (HQQ's group
    # size: adapters.hqq_group_size).
    teacher_quantize: str = "none"
    kd_ratio: float = 0.5
    # Both distributions are softened by it (logits / temperature) before the KL.
    temperature: float = 1.0
    # forward: KL(teacher || student); reverse: KL(student || teacher).
    loss: str = "forward"
    # Label tokens per chunk: the float32 logits of both models exist for one chunk at a time.
    chunk_tokens: int = 1024


@dataclass
class MoEConfig:
    """Training a mixture of experts (a model whose family has them). The routing itself is
    part of the model's shape (model.flavor / its HF config)."""

    # The load-balancing loss's weight (transformers' router_aux_loss_coef). Empty: the model's own
    # (0.001 in the published configs that have one); 0 turns it off.
    aux_loss_coef: float | None = None
    # Models with an expert bias (DeepSeek-V3-style routing): after each step every expert's bias moves
    # by this much toward even load (up if the expert got fewer tokens than the mean, down if more: the
    # DeepSeek-V3 paper's gamma, 0.001). 0 freezes the bias.
    bias_update_rate: float = 0.001


@dataclass
class MetricsConfig:
    log_every: int = 10
    tensorboard: bool = True
    # Peak FLOP/s per device for MFU, in TFLOP/s. Empty: a table of known GPUs, or a matmul measured
    # at start-up on CPU (said so in the log).
    peak_tflops: float | None = None
    # A live progress line: auto (when stdout is a terminal), on, off.
    progress: str = "auto"
    # Append the ids (stream, index) of every window each rank trains on to output_dir/samples/rank-R.jsonl.
    log_samples: bool = False
    # Time each step's phases (data, forward, backward, optimizer, other) into TensorBoard (time/phase_*);
    # on a GPU it synchronizes at each phase boundary (trainer/step_phases.py).
    step_phases: bool = False
    # Profile these steps with torch.profiler: a Chrome trace and the top ops by self time, per rank, under
    # output_dir/profile/ (trainer/profiling.py). The profiled step itself runs slower.
    profile_steps: list[int] = field(default_factory=list)


@dataclass
class FaultConfig:
    """What a run does when a rank hangs or runs slow (trainer/fault/; docs/fault_tolerance.md)."""

    # A rank on which no step (with its validation and checkpoint) completes for this long writes every
    # thread's stack to output_dir/hangs/step-N/rank-R.txt, and the run exits with code 124. 0: no watchdog.
    # Generous: the first step (compiling, warming up) counts too.
    hang_timeout_s: float = 1800.0
    # A console warning names a rank whose compute time per step is more than this times the ranks' median
    # for `straggler_steps` steps in a row (every rank's times go to TensorBoard); 0: not measured.
    straggler_factor: float = 1.3
    straggler_steps: int = 5
    # Faults injected for tests, each "hang:rank=R:step=N", "crash:rank=R:step=N" or "slow:rank=R:factor=F",
    # optionally ":restart=K" (only in in-job restart K; default 0, the first start). Refused unless the
    # environment sets TESSERA_DEBUG_FAULTS=1, so that a copied config can never break a real run.
    inject: list[str] = field(default_factory=list)
    # Replica groups through torchft (trainer/fault/replicas.py; docs/fault_tolerance.md): this many copies of
    # the model, each its own job (FSDP / TP / PP inside it), averaging gradients each step; a group that fails
    # drops out while the others step, and rejoins with a live peer's state. 1: off.
    replica_groups: int = 1
    # This job's group, 0 .. replica_groups - 1 (its checkpoints and logs go to job.output_dir/replica-I).
    replica_id: int = 0
    # The torchft Lighthouse's address (http://host:port); empty: the TORCHFT_LIGHTHOUSE environment variable.
    lighthouse: str = ""
    # Fewest groups that may commit a step.
    min_replicas: int = 1
    # How long a quorum, an all-reduce or a recovery may take before the group counts as failed.
    replica_timeout_s: float = 60.0


@dataclass
class CheckpointConfig:
    """Distributed checkpoints under output_dir/checkpoints/step-N (torch.distributed.checkpoint)."""

    enabled: bool = True
    # Save every `interval` steps, and at the last step.
    interval: int = 100
    # Complete checkpoints to keep (older ones are deleted once a newer one is complete); 0 keeps all.
    keep_last: int = 3
    # Write in the background: training waits only while the state is copied (staged) off the model.
    async_save: bool = False
    # latest: resume from the newest complete checkpoint in output_dir if there is one; none: start
    # from step 0 (new checkpoints then replace old ones of the same step); or a step-N directory.
    resume_from: str = "latest"
    # With resume_from: take only the model weights, and start a new run at step 0.
    load_only_model: bool = False
    # Write the initial weights as checkpoints/step-0 and exit (a reproducible start for multi-node runs).
    create_seed: bool = False


@dataclass
class ExportConfig:
    # At the end of training, write the model as a Hugging Face checkpoint to output_dir/export/hf
    # (with adapters: merged into the base weights).
    hf: bool = False
    # With adapters: the adapter in PEFT's format to output_dir/export/peft, and the frozen base it
    # belongs on as a Hugging Face checkpoint to output_dir/export/base.
    peft: bool = False
    dtype: str = "bfloat16"
    # Quantized exports, each to output_dir/export/NAME in compressed-tensors' format (vLLM's; transformers
    # loads it): w4a16 (int4 weights in groups of qat.group_size), w8a8_int8, w8a8_fp8. After a QAT run of
    # the same weight scheme they hold the trained quantization; otherwise post-training quantization.
    quantized: list[str] = field(default_factory=list)


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    fp8: Float8Config = field(default_factory=Float8Config)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# The quantized exports by name (trainer/qat/export.py's FORMATS, kept equal by a test): export.quantized and
# eval.quantized take them.
QUANTIZED_EXPORTS = ("w4a16", "w8a8_int8", "w8a8_fp8")

CHOICES: dict[str, tuple[str, ...]] = {
    "tokenizer.kind": ("auto", "byte", "hf", "sentencepiece", "tiktoken", "gpt2"),
    "data.format": ("auto", "text", "json", "parquet"),
    "data.text_sample_by": ("document", "paragraph", "line"),
    "data.task": ("pretrain", "sft"),
    "data.attention": ("auto", "causal", "document"),
    "data.sft_format": ("auto", "alpaca", "messages", "sharegpt"),
    "training.mixed_precision_param": ("auto", "float32", "bfloat16"),
    "training.mixed_precision_reduce": ("float32", "bfloat16"),
    "optimizer.name": ("adamw", "adamw_bf16", "adamw_8bit", "adamw_4bit"),  # trainer/optimizer.py: OPTIMIZERS
    "optimizer.implementation": ("auto", "fused", "foreach", "for-loop"),
    "optimizer.compile_step": ("auto", "always", "never"),
    "optimizer.offload": ("none", "cpu"),
    "training.cpu_malloc": ("retain", "system"),
    "lr_scheduler.decay_type": ("cosine", "linear", "constant"),
    "parallel.fsdp_reshard_after_forward": ("default", "always", "never"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved_1f1b"),
    "adapters.quantize_base": ("none", "nf4", "bnb_nf4", "hqq"),
    "activation_checkpoint.mode": ("none", "full", "selective_layer", "selective_op"),
    "adapters.kind": ("none", "lora", "dora"),
    "qat.scheme": ("none", "int8_dynact_int4_weight", "int4_weight_only", "int8_dynact_int8_weight", "float8"),
    "fp8.recipe": ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
    "distill.loss": ("forward", "reverse"),
    "training.chunked_loss": ("auto", "always", "never"),
    "distill.teacher_quantize": ("none", "nf4", "bnb_nf4", "hqq"),
    "metrics.progress": ("auto", "on", "off"),
    "export.dtype": ("float32", "bfloat16"),
}
