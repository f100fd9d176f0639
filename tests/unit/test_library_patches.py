"""parallel/library_patches.py: every private torch / torchao name the project relies on still exists
(this fails loudly when a library moves one), and each change to a library's global state is undone when
the run that needed it ends, and never made by --check or --dry-run."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

import train
from parallel.library_patches import PRIVATE_NAMES, SCHEDULER_LAST_LR_KEY, async_tp_compile, float8_all_gather_over_gloo, resolve


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_every_private_name_resolves(name):
    if name.startswith("torchao"):
        pytest.importorskip("torchao")
    assert resolve(name) is not None


def test_the_schedulers_last_lr_key():
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1.0)
    assert SCHEDULER_LAST_LR_KEY in scheduler.state_dict()


def _table() -> dict:
    from torchao.float8 import float8_ops

    ops = (torch.ops._c10d_functional.all_gather_into_tensor.default, torch.ops.c10d_functional.all_gather_into_tensor.default)
    return {op: float8_ops.FLOAT8_OPS_TABLE[op] for op in ops}


def test_the_float8_gloo_gather_is_undone_and_never_made_by_check_or_dry_run(tmp_path, capsys):
    pytest.importorskip("torchao")
    before = _table()
    with float8_all_gather_over_gloo():
        during = _table()
        assert all(during[op] is not before[op] for op in before)
    assert _table() == before
    tp_float8 = ["fp8.enabled=true", "fp8.emulate=true", "parallel.tp=2", f"job.output_dir={tmp_path}"]
    for command in ("--dry-run", "--check"):
        assert train.main(["--config", "configs/debug.yaml", command, "--world-size", "2", *tp_float8]) == 0
        assert _table() == before, command


def test_async_tp_switch_is_undone():
    import torch._inductor.config as inductor_config

    with socket.socket() as s:  # a free port for the one-rank group
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        before = inductor_config._micro_pipeline_tp
        with async_tp_compile(dist.group.WORLD):
            assert inductor_config._micro_pipeline_tp is True
        assert inductor_config._micro_pipeline_tp == before
    finally:
        dist.destroy_process_group()


def test_import_noise_is_dropped_and_nothing_else(tmp_path):
    """torchao's "Failed to load ...so" lines and torch's pytree deprecation warning, once per rank, were
    10 of 19 lines of a 2-rank QLoRA run; other warnings of the same loggers still show."""
    import logging
    import subprocess
    import sys

    from parallel.library_patches import quiet_import_noise
    from tests.helpers import REPO

    result = subprocess.run([sys.executable, "train.py", "--config", "configs/debug.yaml", "--dry-run", "fp8.enabled=true",
                             "fp8.emulate=true", "adapters.kind=lora", f"job.output_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr
    quiet_import_noise()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torchao")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load x.so: no such file")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]
