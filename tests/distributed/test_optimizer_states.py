"""Each optimizer.name (and the optimizer offloaded to host memory) on 2 real FSDP2 ranks (gloo) against
one process, on 2 tensor-parallel ranks, and its checkpoint written by the 2 FSDP ranks resumed by 2 ranks
(exactly) and by one process (another layout: quantized moments are quantized afresh there).

All choices run in one pair of processes to keep the suite short. Both ranks train on the same batch, so
the averaged gradient equals one process's exactly; the 8,192-value weights split into 4,096-value shards
that hold whole quantization blocks, so sharded and whole moments quantize alike and every choice must
match one process bit for bit under FSDP."""

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

from trainer.checkpoint.state import ModelState, OptimizerState
from trainer.config.schema import LRSchedulerConfig, OptimizerConfig
from trainer.optimizer import Optimizers

# row -> (optimizer.name, optimizer.offload)
NAMES = {"adamw": ("adamw", "none"), "adamw_bf16": ("adamw_bf16", "none"), "adamw_8bit": ("adamw_8bit", "none"),
         "adamw_4bit": ("adamw_4bit", "none"), "adamw offloaded": ("adamw", "cpu")}
SAVED_AT, STEPS = 3, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 64))


def _optimizers(model: nn.Module, row: str, offload: str | None = None) -> Optimizers:
    name, row_offload = NAMES[row]
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1, offload=offload or row_offload)
    return Optimizers([model], cfg, LRSchedulerConfig(warmup_steps=0, decay_type="constant"), STEPS,
                      torch.device("cpu"))


def _train(model, opts, steps: range, save_to=None) -> None:
    batch = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    for step in steps:
        model(batch).square().mean().backward()
        opts.step()
        opts.zero_grad()
        if save_to is not None and step == SAVED_AT:
            dcp.save({"model": ModelState([model]), "optimizer": OptimizerState(opts)}, checkpoint_id=str(save_to))


def _sharded(mesh, name: str):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _optimizers(model, name)


def _load(model, opts, path: str) -> None:
    """As the checkpoint manager restores: the optimizer told which entries the checkpoint holds."""
    state = {"model": ModelState([model]), "optimizer": OptimizerState(opts)}
    state["optimizer"].loading_from(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    opts.schedulers[0].last_epoch = SAVED_AT


def _ranks(rank: int, tmp: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results, resumed = {}, {}
    for name in NAMES:
        model, opts = _sharded(mesh, name)
        _train(model, opts, range(1, STEPS + 1), save_to=f"{tmp}/{name}")
        results[name] = [p.full_tensor() for p in model.parameters()]
        # Resumed on the same layout by a fresh model and optimizer (what a restart after kill -9 does).
        model, opts = _sharded(mesh, name)
        _train(model, opts, range(1, 2))
        _load(model, opts, f"{tmp}/{name}")
        _train(model, opts, range(SAVED_AT + 1, STEPS + 1))
        resumed[name] = [p.full_tensor() for p in model.parameters()]
    tensor_parallel = {}
    for name in NAMES:  # tensor parallelism: the first linear split by columns, the second by rows
        model = _model()
        parallelize_module(model, mesh, {"0": ColwiseParallel(output_layouts=Replicate()),
                                         "3": RowwiseParallel(input_layouts=Replicate())})
        opts = _optimizers(model, name)
        _train(model, opts, range(1, STEPS + 1))
        tensor_parallel[name] = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    if rank == 0:
        torch.save({"results": results, "resumed": resumed, "tp": tensor_parallel}, f"{tmp}/results.pt")
    dist.destroy_process_group()


def test_each_optimizer_on_two_fsdp_ranks_matches_one_process_and_resumes_exactly(tmp_path):
    """Also: the 2 ranks' step-3 checkpoint resumed by 2 fresh ranks continues bit for bit, and resumed by
    one process (another layout) continues closely: the moments' values reshard exactly, but quantized
    ones get new blocks there (other shards), so their last 2 steps differ a little. The offloaded
    optimizer's checkpoint is resumed without offloading."""
    mp.spawn(_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    saved = torch.load(tmp_path / "results.pt")
    sharded = saved["results"]
    for name in NAMES:
        assert all(torch.equal(a, b) for a, b in zip(saved["resumed"][name], sharded[name])), name
        model = _model()
        _train(model, _optimizers(model, name), range(1, STEPS + 1))
        for ours, theirs in zip(model.parameters(), sharded[name]):
            assert torch.equal(ours.detach(), theirs), name
        # Under TP the row-split matmul sums partial products (float32 rounding moves), and the row-split
        # weight's shards hold other quantization blocks than the whole weight's: close, not equal (measured
        # 3.7e-3 for 8-bit and 2.6e-2 for 4-bit's coarse codes after 5 steps of lr = 1e-2).
        tp = max((a - b).abs().max().item() for a, b in zip(model.parameters(), saved["tp"][name]))
        print(f"\n{name} under TP: largest difference from one process {tp:.1e}")
        assert tp < {"adamw": 1e-5, "adamw_bf16": 1e-3, "adamw_4bit": 5e-2}.get(name, 1e-2), (name, tp)

        resumed = _model()
        opts = _optimizers(resumed, name, offload="none")  # an offloaded run's checkpoint resumes without offload
        _train(resumed, opts, range(1, 2))  # the optimizer's state exists before it is loaded into
        _load(resumed, opts, str(tmp_path / name))
        _train(resumed, opts, range(SAVED_AT + 1, STEPS + 1))
        worst = max((a - b).abs().max().item() for a, b in zip(resumed.parameters(), sharded[name]))
        if NAMES[name][0] in ("adamw", "adamw_bf16"):
            assert worst == 0.0, name
        else:  # two steps of up to ~lr = 1e-2 each; 4-bit codes are coarse: a fresh quantization moves them more
            assert worst < (1e-3 if name == "adamw_8bit" else 1e-2), (name, worst)
