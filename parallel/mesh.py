"""ParallelDims: the parallel layout, checked against the world size and the model, and its DeviceMesh.

The mesh's dimensions are (pp, dp_replicate, dp_shard, tp), outermost first: tensor parallelism talks
the most, so its ranks are neighbours (the same node); pipeline stages talk the least.
"""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError
from trainer.config.schema import ParallelConfig
from trainer.model.args import ModelArgs


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        dp_replicate, dp_shard, tp, pp = cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.pp
        for name, value in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp)):
            if value < 1:
                raise ConfigError(f"parallel.{name}={value} must be at least 1")
        others = dp_replicate * tp * pp
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"parallel sizes pp x dp_replicate x tp = {pp} x {dp_replicate} x {tp} = {others} do not "
                    f"divide the world size {world_size}"
                )
            dp_shard = world_size // others
        if dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={dp_shard} must be at least 1, or -1 for the rest of the world")
        if others * dp_shard != world_size:
            raise ConfigError(
                f"parallel sizes pp x dp_replicate x dp_shard x tp = {pp} x {dp_replicate} x {dp_shard} x {tp} = "
                f"{others * dp_shard} do not multiply to the world size {world_size}; set parallel.dp_shard=-1 to use the rest"
            )
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp, world_size=world_size)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_model(self, args: ModelArgs, cfg: ParallelConfig) -> None:
        """Layout constraints that depend on the model's shape."""
        if self.tp > 1:
            for name in ("n_heads", "n_kv_heads"):
                if getattr(args, name) % self.tp:
                    raise ConfigError(
                        f"parallel.tp={self.tp} does not divide the model's {name}={getattr(args, name)}; "
                        f"pick a tp that divides both n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads}"
                    )
            if args.hidden_dim % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} does not divide the model's MLP hidden size {args.hidden_dim}")
            if cfg.loss_parallel and args.vocab_size % self.tp:
                raise ConfigError(
                    f"parallel.loss_parallel shards the vocabulary ({args.vocab_size}) over tp={self.tp}, which does "
                    f"not divide it; set model.vocab_size to a multiple of {self.tp} or parallel.loss_parallel=false"
                )
        if args.tie_embeddings and (self.tp > 1 or self.pp > 1):
            raise ConfigError(
                "tied embeddings (model.tie_embeddings) cannot be split by tensor or pipeline parallelism; "
                "use parallel.tp=1 and parallel.pp=1 for this model, or untie them"
            )
        stages = self.num_stages(cfg)
        if stages > args.n_layers:
            raise ConfigError(
                f"parallel.pp={self.pp} with {stages // self.pp} stage(s) per rank makes {stages} pipeline stages, "
                f"more than the model's {args.n_layers} layers"
            )

    def num_stages(self, cfg: ParallelConfig) -> int:
        per_rank = cfg.pp_stages_per_rank if cfg.pp_schedule == "interleaved_1f1b" else 1
        return self.pp * per_rank if self.pp > 1 else 1


@dataclass(frozen=True)
class Meshes:
    """The named sub-meshes a run uses; a dimension of size 1 has no mesh (None)."""

    world: DeviceMesh
    dp: DeviceMesh | None  # all data-parallel ranks (replicate x shard): data loading, loss sums
    fsdp: DeviceMesh | None  # what fully_shard shards over: dp_shard, or (dp_replicate, dp_shard) for HSDP
    tp: DeviceMesh | None
    pp: DeviceMesh | None


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes | None:
    if dims.world_size == 1:
        return None
    names = ("pp", "dp_replicate", "dp_shard", "tp")
    world = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=names)
    # Flattened meshes are kept here: slicing them from the root again is deprecated.
    dp = world[("dp_replicate", "dp_shard")]._flatten("dp") if dims.dp_size > 1 else None
    fsdp = None
    if dims.dp_size > 1:
        fsdp = world[("dp_replicate", "dp_shard")] if dims.dp_replicate > 1 else world["dp_shard"]
    return Meshes(
        world=world, dp=dp, fsdp=fsdp, tp=world["tp"] if dims.tp > 1 else None, pp=world["pp"] if dims.pp > 1 else None
    )


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
