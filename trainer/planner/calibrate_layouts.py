"""What the parallel wrappers cost beyond their collectives' bytes, measured through the project's own
meshes and parallelize() on a small Llama in the calibration's 2 processes.

A raw all-gather is not what FSDP2 pays per block: it copies the shards into a flat buffer and back out
into the parameters, reduce-scatters gradients it first concatenates, and runs Python per unit; tensor
parallelism adds DTensor's dispatch of every redistribution and linear, and a latency per collective.
On a GPU most of that hides behind the kernels; on CPU it runs on the cores that compute (a 2-rank FSDP
step of a 33.6M-parameter model spent 0.43 s of 3.7 s in copy_ and cat, a 1-rank step 0.02 s). So:

- FSDP: the same model sharded over the 2 ranks and whole on each, forward alone and forward + backward,
  at two widths; per block, gather = sharded forward - whole forward, reduce = sharded step - whole step
  - two gathers (forward, and backward's re-gather: every block reshards). Fitted as latency + bytes /
  bandwidth over the two widths, as a Link per block.
- Replicas (HSDP of 2 x 1): the same, the reduce an all-reduce of every gradient.
- Tensor parallelism: a narrow model split over the 2 ranks against the same model whole, per block and
  step, at a size where its compute is small: the fixed cost of a split block beyond its bytes.
"""

import statistics
import time

import torch
import torch.distributed as dist

from trainer.planner.devices import Link

FSDP_DIMS = (256, 768)  # two widths: blocks of 0.8M and 6.8M parameters
TP_DIM = 128
LAYERS = 4
TRIALS = 7
TOKENS = 32  # per sequence; one sequence: the compute stays small beside the wrappers' costs


def _args(dim: int):
    from models.llama.args import LlamaArgs

    return LlamaArgs(dim=dim, n_layers=LAYERS, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=3 * dim,
                     max_seq_len=TOKENS)


def _model(dim: int, device: torch.device):
    from trainer.build import build_whole_model

    return build_whole_model(_args(dim), [], init_from=None, seed=0, device=device)


def _forward(model, tokens):
    with torch.no_grad():
        model(tokens)


def _step(model, tokens):
    model(tokens).float().mean().backward()
    model.zero_grad(set_to_none=True)


def _once(fn, sync) -> float:
    """One timed call, the ranks starting it together."""
    dist.barrier()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _costs(make, tokens, sync) -> tuple[float, float]:
    """(forward, forward + backward) seconds per block of a parallelized model beyond the same model whole:
    the median over trials of each pair's difference (the two timed back to back, so that the machine's
    drift over seconds cancels)."""
    whole, split = make(False), make(True)
    out = []
    for run in (_forward, _step):
        for model in (whole, split):  # warm-up, once each
            run(model, tokens)
        differences = []
        for _ in range(TRIALS):
            pair = [_once(lambda m=m: run(m, tokens), sync) for m in (whole, split)]
            differences.append(pair[1] - pair[0])
        out.append(max(0.0, statistics.median(differences)) / LAYERS)
    return tuple(out)


def _fsdp_links(world: int, replicate: bool, device: torch.device, sync) -> tuple[Link, Link]:
    """(per-block gather, per-block reduce) of FSDP2 over `world` ranks (replicate: HSDP of world x 1),
    bus bytes as estimate.py counts them."""
    from models import build_meta_model
    from parallel.fsdp import apply_fsdp
    from parallel.mesh import ParallelDims, build_meshes

    dims = ParallelDims.from_sizes(dp_replicate=world if replicate else 1, dp_shard=1 if replicate else world, tp=1, pp=1,
                                   world_size=world)
    mesh = build_meshes(dims, device.type).fsdp.mesh
    gathers, reduces = [], []
    for dim in FSDP_DIMS:
        def make(split: bool, dim=dim):
            model = _model(dim, device)
            if split:
                apply_fsdp(model, mesh=mesh, param_dtype=torch.float32, reduce_dtype=torch.float32,
                           reshard_after_forward="always", cpu_offload=False)
            return model

        block_bytes = sum(p.numel() for p in build_meta_model(_args(dim)).layers["0"].parameters()) * 4
        tokens = torch.randint(0, 128, (1, TOKENS), device=device)
        forward, step = _costs(make, tokens, sync)
        share = (world - 1) / world
        gathers.append((0.0 if replicate else block_bytes * share, forward))
        reduces.append((block_bytes * (2 * share if replicate else share), max(0.0, step - 2 * forward)))
    if replicate:  # nothing to gather: a forward costs the units' own overhead, a latency per block
        return Link(statistics.fmean(s for _, s in gathers), 1.0), Link.fit(reduces)
    return Link.fit(gathers), Link.fit(reduces)


def _tp_costs(world: int, device: torch.device, sync) -> tuple[float, float]:
    """Seconds a tensor-parallel block's forward, and its forward + backward, cost beyond compute and bytes."""
    from models.llama import FAMILY
    from parallel.mesh import ParallelDims, build_meshes
    from parallel.tp import apply_tp

    dims = ParallelDims.from_sizes(dp_replicate=1, dp_shard=1, tp=world, pp=1, world_size=world)
    mesh = build_meshes(dims, device.type).tp.mesh

    def make(split: bool):
        model = _model(TP_DIM, device)
        if split:
            apply_tp(model, tp_mesh=mesh, plan=FAMILY.tp_plan(model, loss_parallel=False))
        return model

    return _costs(make, torch.randint(0, 128, (1, TOKENS), device=device), sync)


def layout_costs(world: int, device: torch.device, sync) -> dict:
    """DeviceProfile's fields: {"fsdp_links": {"gather", "reduce", "replicate_gather", "replicate_reduce":
    Link}, "tp_forward_s", "tp_block_s"}, run on every rank of a `world`-rank group (rank 0's answer is kept)."""
    links = {}
    for replicate in (False, True):
        prefix = "replicate_" if replicate else ""
        links[prefix + "gather"], links[prefix + "reduce"] = _fsdp_links(world, replicate, device, sync)
    forward, block = _tp_costs(world, device, sync)
    return {"fsdp_links": links, "tp_forward_s": forward, "tp_block_s": block}
