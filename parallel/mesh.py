"""ParallelDims: the parallel layout, checked against the world size, and the DeviceMesh it builds."""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def from_config(cls, dp_replicate: int, dp_shard: int, world_size: int) -> "ParallelDims":
        if dp_replicate < 1:
            raise ConfigError(f"parallel.dp_replicate={dp_replicate} must be at least 1")
        if dp_shard == -1:
            if world_size % dp_replicate:
                raise ConfigError(
                    f"parallel.dp_replicate={dp_replicate} does not divide the world size {world_size}"
                )
            dp_shard = world_size // dp_replicate
        if dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={dp_shard} must be at least 1, or -1 for the rest of the world")
        if dp_replicate * dp_shard != world_size:
            raise ConfigError(
                f"parallel sizes dp_replicate x dp_shard = {dp_replicate} x {dp_shard} = {dp_replicate * dp_shard} "
                f"do not multiply to the world size {world_size}; set parallel.dp_shard=-1 to use the rest"
            )
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, world_size=world_size)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_size > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The mesh, with a flattened "dp" dimension for data loading and loss reduction; None on 1 rank."""
        if self.world_size == 1:
            return None
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
        mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        return mesh

    def dp_rank(self, mesh: DeviceMesh | None) -> int:
        return 0 if mesh is None else mesh["dp"].get_local_rank()


def fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """HSDP (replicate x shard, 2-D) when dp_replicate > 1, else plain FSDP over dp_shard."""
    if dims.dp_replicate > 1:
        return mesh[("dp_replicate", "dp_shard")]
    return mesh["dp_shard"]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
