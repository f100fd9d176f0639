"""Real float8 matmuls on a GPU of compute capability 8.9+ (skipped elsewhere: CPU runs test float8's
numerics with torchao's emulation, tests/e2e/test_float8_training.py). Run on such a machine with
`pytest -s tests/gpu`; the step times it prints are a smoke check, the benchmark tables live in docs."""

import pytest
import torch

from tests.helpers import run_train, tensorboard_scalars

pytest.importorskip("torchao")
if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs an NVIDIA GPU of compute capability 8.9+ (float8 matmuls); this machine has none",
                allow_module_level=True)

COMMON = ["--config", "configs/debug.yaml", "training.steps=30", "metrics.log_every=1", "checkpoint.enabled=false",
          "training.mixed_precision_param=bfloat16", "compile.enabled=true", "model.dim=1024", "model.n_heads=8",
          "model.n_kv_heads=4", "training.seq_len=1024"]


def test_real_float8_trains_like_bf16(tmp_path):
    final = {}
    for name, extra in (("bf16", []), ("float8", ["fp8.enabled=true"]), ("float8 rowwise", ["fp8.enabled=true", "fp8.recipe=rowwise"])):
        result = run_train([*COMMON, *extra, f"job.output_dir={tmp_path / name.replace(' ', '_')}"])
        assert result.returncode == 0, result.stderr[-3000:]
        if extra:
            assert "float8 matmuls)" in result.stdout and "mfu_mixed" in result.stdout
        final[name] = tensorboard_scalars(tmp_path / name.replace(" ", "_"), "loss/train")[30]
    print(f"\nGPU float8 loss at step 30: {final}")
    for name in ("float8", "float8 rowwise"):
        assert abs(final[name] - final["bf16"]) / final["bf16"] < 0.03
