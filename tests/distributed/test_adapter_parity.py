"""LoRA / DoRA training sharded over real gloo ranks against the single process."""

import pytest

from tests.helpers import QUANT_SHAPE, run_train, tensorboard_scalars

COMMON = ["--config", "configs/debug.yaml", "training.steps=4", "metrics.log_every=1", "checkpoint.enabled=false"]


@pytest.mark.parametrize("kind,layout", [("dora", ["parallel.dp_shard=2"]), ("lora", ["parallel.pp=2"]), ("dora", ["parallel.tp=2"])], ids=["fsdp", "pp", "tp"])
def test_adapters_on_two_ranks_match_one(tmp_path, kind, layout):
    adapters = [f"adapters.kind={kind}", "adapters.rank=4", "optimizer.lr=1e-2"]
    one = run_train([*COMMON, *adapters, f"job.output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert ("training 37,376 of 857,728 parameters" if kind == "lora" else "training 42,240 of 862,592 parameters") in one.stdout
    two = run_train([*COMMON, *adapters, *layout, f"job.output_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tensorboard_scalars(tmp_path / "one", "loss/train"), tensorboard_scalars(tmp_path / "two", "loss/train")
    assert a[4] < a[1] - 0.1  # the adapters learn
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"\nPARITY {kind} with {' '.join(layout)} vs 1 process: max |loss difference| = {worst:.2e}")
    assert worst < 1e-5, (a, b)


@pytest.mark.parametrize("kind,base", [("lora", "nf4"), ("dora", "nf4"), ("dora", "bnb_nf4"), ("lora", "hqq")])
def test_4bit_base_on_two_fsdp_ranks_matches_one(tmp_path, kind, base):
    args = [*COMMON, *QUANT_SHAPE, "training.steps=3", f"adapters.kind={kind}", f"adapters.quantize_base={base}", "optimizer.lr=1e-2"]
    one = run_train([*args, f"job.output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train([*args, "parallel.dp_shard=2", f"job.output_dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = tensorboard_scalars(tmp_path / "one", "loss/train"), tensorboard_scalars(tmp_path / "two", "loss/train")
    assert a[3] < a[1] - 0.1  # the adapters learn over the frozen 4-bit base
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"\nPARITY {kind} over {base}, dp_shard=2 vs 1 process: max |loss difference| = {worst:.2e}")
    assert worst < 1e-5, (a, b)
