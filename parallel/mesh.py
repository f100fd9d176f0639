"""ParallelDims: the parallel layout, checked against the world size and the model, and its DeviceMesh.

The mesh's dimensions are (pp, dp_replicate, dp_shard, cp, tp), outermost first: tensor parallelism talks
the most, so its ranks are neighbours (the same node); context parallelism (a key/value all-gather per
layer) next; pipeline stages talk the least. FSDP shards over dp_shard x cp, as torchtitan does: cp ranks
hold different tokens of the same sequences, so for the parameters they are data-parallel ranks.

Expert parallelism is formed from the data-parallel ranks, as torchtitan forms it: dp_shard splits into
(dp_shard / ep, ep), ep the innermost data dimension, inside cp (neighbours: its all-to-all moves every
routed token twice per layer). Each ep rank holds num_experts / ep experts, which FSDP shards further
over the rest of dp_shard x cp; every other parameter is sharded over dp_shard x cp as without ep.

Under tensor parallelism a mixture-of-experts layer runs on each rank's own slice of the sequence (the
residual stream is split along it between blocks; models/qwen3_moe/parallel.py), so the tp ranks route
different tokens, exactly as data-parallel ranks do. They then split the experts further, as torchtitan
borrows them for expert parallelism: the experts are split over ep x tp ranks (adjacent in the mesh, so the
all-to-all stays among neighbours), each holding num_experts / (ep x tp) of them whole. The layer's other
parameters (router, shared experts) are sharded by FSDP over the fsdp ranks x tp, which sums their
gradients over all those tokens.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class LayoutError(ValueError):
    """Parallel sizes that do not fit the world: the caller reports it as a user mistake."""


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1
    ep: int = 1

    @classmethod
    def from_sizes(cls, *, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int, cp: int = 1,
                   ep: int = 1) -> "ParallelDims":
        """`dp_shard=-1` takes what the world leaves over. The messages name the sizes as the config's
        `parallel.*` keys, which is where every caller takes them from."""
        for name, value in (("dp_replicate", dp_replicate), ("cp", cp), ("tp", tp), ("pp", pp)):
            if value < 1:
                raise LayoutError(f"parallel.{name}={value} must be at least 1")
        others = dp_replicate * cp * tp * pp
        # cp is named only where it is used, so the messages of the 4-D layouts stay as they were.
        cp_name, cp_size = (" x cp", f" x {cp}") if cp > 1 else ("", "")
        if dp_shard == -1:
            if world_size % others:
                raise LayoutError(
                    f"parallel sizes pp x dp_replicate{cp_name} x tp = {pp} x {dp_replicate}{cp_size} x {tp} = {others} do "
                    f"not divide the world size {world_size}"
                )
            dp_shard = world_size // others
        if dp_shard < 1:
            raise LayoutError(f"parallel.dp_shard={dp_shard} must be at least 1, or -1 for the rest of the world")
        if others * dp_shard != world_size:
            raise LayoutError(
                f"parallel sizes pp x dp_replicate x dp_shard{cp_name} x tp = {pp} x {dp_replicate} x {dp_shard}{cp_size} x {tp} = "
                f"{others * dp_shard} do not multiply to the world size {world_size}; set parallel.dp_shard=-1 to use the rest"
            )
        if ep < 1 or dp_shard % ep:
            raise LayoutError(f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard}: expert parallelism is formed "
                              f"from the data-parallel ranks that shard the model (FSDP)")
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp, world_size=world_size, cp=cp, ep=ep)

    @property
    def dp_size(self) -> int:
        """Ranks that read different sequences (cp ranks read slices of the same ones)."""
        return self.dp_replicate * self.dp_shard

    @property
    def expert_split(self) -> int:
        """How many ranks split a mixture-of-experts layer's experts among them: ep x tp."""
        return self.ep * self.tp

    @property
    def fsdp_shards(self) -> int:
        """How many pieces FSDP cuts each parameter into: dp_shard x cp."""
        return self.dp_shard * self.cp


    def describe(self) -> str:
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        ep = f" (ep {self.ep} of it)" if self.ep > 1 else ""
        return f"pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}{ep}{cp} x tp {self.tp}"

    def num_stages(self, stages_per_rank: int) -> int:
        """Pipeline stages in all: `stages_per_rank` of them on each pipeline rank (interleaved schedules)."""
        return self.pp * stages_per_rank if self.pp > 1 else 1


@dataclass(frozen=True)
class SubMesh:
    """One named dimension of the layout. Of size 1 it holds no DeviceMesh and its collectives do nothing,
    so callers use it the same way at any world size, with no None checks (a null object)."""

    mesh: DeviceMesh | None = None

    @property
    def active(self) -> bool:
        return self.mesh is not None

    @property
    def size(self) -> int:
        return self.mesh.size() if self.mesh is not None else 1

    @property
    def local_rank(self) -> int:
        return self.mesh.get_local_rank() if self.mesh is not None else 0

    @property
    def group(self):
        """The process group (None where there is no communication to do)."""
        return self.mesh.get_group() if self.mesh is not None else None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` in place over this dimension's ranks; returns it."""
        if self.mesh is not None:
            dist.all_reduce(tensor, group=self.mesh.get_group())
        return tensor


@dataclass(frozen=True)
class Meshes:
    """The named sub-meshes a run uses; a dimension of size 1 is an inactive SubMesh."""

    world: DeviceMesh | None  # None for a single process
    dp: SubMesh  # all data-parallel ranks (replicate x shard): data loading, loss sums
    fsdp: SubMesh  # what fully_shard shards over: dp_shard x cp, or (dp_replicate, dp_shard x cp) for HSDP
    tp: SubMesh
    pp: SubMesh
    cp: SubMesh = SubMesh()  # ranks holding slices of the same sequences: loss and token sums
    # The ranks that split the experts among them and exchange tokens (all-to-all): ep, x tp under tensor
    # parallelism (a MoE model's only; a dense model's is inactive).
    ep: SubMesh = SubMesh()
    # What fully_shard shards each expert-splitting rank's experts over: the rest of dp_shard x cp
    # (dp_replicate first for HSDP). Active exactly when ep is, even of size 1, so that the experts are a unit
    # of their own, whose gradients FSDP reduces too.
    expert_fsdp: SubMesh = SubMesh()
    # Under tp, what fully_shard shards a MoE layer's other parameters (router, shared experts) over: the
    # fsdp ranks x tp, whose tokens all pass through them.
    moe_fsdp: SubMesh = SubMesh()


def _flat(world: DeviceMesh, names: tuple[str, ...], size: dict[str, int], replicate: int = 1) -> DeviceMesh:
    """The ranks of the dimensions `names` (those of size 1 left out, the first kept if all are) as one
    dimension; with `replicate` > 1, dp_replicate in front of it (HSDP: it only all-reduces)."""
    names = tuple(n for n in names if size[n] > 1) or names[:1]
    flat = world[names[0]] if len(names) == 1 else world[names]._flatten("_".join(names))
    return world[("dp_replicate", flat.mesh_dim_names[0])] if replicate > 1 else flat


def build_meshes(dims: ParallelDims, device_type: str, moe: bool = False) -> Meshes:
    """`moe`: the model has mixture-of-experts layers (the tp ranks split their experts too)."""
    if dims.world_size == 1:
        return Meshes(world=None, dp=SubMesh(), fsdp=SubMesh(), tp=SubMesh(), pp=SubMesh())
    if dims.ep > 1:  # dp_shard as (dp_shard / ep, ep) around cp, flattened back for all but the experts
        names = ("pp", "dp_replicate", "dp_shard_out_ep", "cp", "ep", "tp")
        world = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.cp, dims.ep,
                                               dims.tp), mesh_dim_names=names)
        world[("dp_shard_out_ep", "ep")]._flatten("dp_shard")
    else:
        names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        world = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp),
                                 mesh_dim_names=names)
    # Flattened meshes are kept here: slicing them from the root again is deprecated.
    dp = world[("dp_replicate", "dp_shard")]._flatten("dp") if dims.dp_size > 1 else None
    # The dimensions FSDP shards over; with ep, dp_shard and cp interleave: (dp_shard / ep, cp, ep).
    shard = ("dp_shard_out_ep", "cp", "ep") if dims.ep > 1 else ("dp_shard", "cp")
    fsdp = None
    if dims.dp_size * dims.cp > 1:
        if dims.cp == 1:
            fsdp = world[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else world["dp_shard"]
        else:  # the flattened mesh as _flatten returns it (slicing it from the root again is deprecated)
            fsdp = world[shard]._flatten("dp_shard_cp")
            if dims.dp_replicate > 1:
                fsdp = world[("dp_replicate", "dp_shard_cp")]
    size = {"dp_shard": dims.dp_shard, "dp_shard_out_ep": dims.dp_shard // dims.ep, "cp": dims.cp, "ep": dims.ep,
            "tp": dims.tp}
    ep = expert_fsdp = moe_fsdp = None
    if moe and dims.expert_split > 1:
        ep = _flat(world, ("ep", "tp"), size)
        if dims.ep > 1:
            expert_fsdp = _flat(world, ("dp_shard_out_ep", "cp"), size, dims.dp_replicate)
        else:  # the ranks of the rest of the model (or one: the experts are a unit of their own all the same)
            expert_fsdp = fsdp if fsdp is not None else world["dp_shard"]
    if moe and dims.tp > 1:
        moe_fsdp = _flat(world, (*shard, "tp"), size, dims.dp_replicate)
    return Meshes(
        world=world, dp=SubMesh(dp), fsdp=SubMesh(fsdp), tp=SubMesh(world["tp"] if dims.tp > 1 else None),
        pp=SubMesh(world["pp"] if dims.pp > 1 else None), cp=SubMesh(world["cp"] if dims.cp > 1 else None),
        ep=SubMesh(ep), expert_fsdp=SubMesh(expert_fsdp), moe_fsdp=SubMesh(moe_fsdp),
    )


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
