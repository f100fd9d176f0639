"""torch.compile per block, composed with selective activation checkpointing and FSDP2 on 2 real ranks,
against the eager single process: full training, and QDoRA over an NF4 base with document attention and
context parallelism (the key/value all-gather inside the compiled blocks). Compiling costs about
45 s on CPU, so these are the only compile tests."""

import os

import pytest

from tests.helpers import QUANT_SHAPE, REPO, document_attention, run_train, tensorboard_scalars

COMMON = ["--config", "configs/debug.yaml", "training.steps=4", "metrics.log_every=1"]
QDORA = [*QUANT_SHAPE, "adapters.kind=dora", "adapters.quantize_base=nf4", "optimizer.lr=1e-2", "checkpoint.enabled=false"]


@pytest.mark.parametrize("name,method", [("full", []), ("QDoRA over NF4, document attention, cp=2", QDORA)])
def test_compiled_checkpointed_sharded_matches_eager(tmp_path, name, method):
    if "document" in name:
        method = [*method, *document_attention()]
    eager = run_train([*COMMON, *method, f"job.output_dir={tmp_path / 'eager'}"])
    assert eager.returncode == 0, eager.stderr[-3000:]
    # A cache directory that outlives the test: later runs on the same machine skip most compilation.
    cache = {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))}
    # The document-attention case splits each sequence over the 2 ranks instead (cp: FSDP over dp_shard x cp).
    layout = "parallel.cp=2" if "document" in name else "parallel.dp_shard=2"
    compiled = run_train(
        [*COMMON, *method, f"job.output_dir={tmp_path / 'compiled'}", "compile.enabled=true", "activation_checkpoint.mode=selective_op",
         layout],
        nproc=2, env=cache,
    )
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    reference = tensorboard_scalars(tmp_path / "eager", "loss/train")
    loss = tensorboard_scalars(tmp_path / "compiled", "loss/train")
    worst = max(abs(loss[s] - reference[s]) for s in reference)
    print(f"\nPARITY compile + selective_op AC + {layout} ({name}): max |loss - eager single| = {worst:.2e}")
    assert sorted(loss) == [1, 2, 3, 4] and worst < 1e-4, (loss, reference)
