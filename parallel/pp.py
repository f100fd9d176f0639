"""Pipeline parallelism: the model's layers split into stages, run by a torch.distributed.pipelining schedule.

Each stage is a copy of the meta model with the other stages' modules removed, so parameter names are
unchanged (layers stay keyed by their global id). With interleaved 1F1B, rank r holds stages r, r + pp,
r + 2 pp, ...: the "looped" assignment the schedule expects.
"""

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layers(n_layers: int, num_stages: int, stage: int) -> range:
    """Layers of a stage: an even split, with the remainder going to the earliest stages."""
    base, extra = divmod(n_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def split_stages(model: nn.Module, *, pp_rank: int, pp_size: int, num_stages: int) -> list[tuple[int, nn.Module]]:
    """(stage index, stage module) for every stage this pipeline rank runs; `model` is on the meta device.

    The model is a decoder in the shape every family here has: `layers` (a ModuleDict keyed by layer id),
    `tok_embeddings` before them and `norm` + `output` after them, which a stage without them sets to None."""
    parts = []
    for stage in range(pp_rank, num_stages, pp_size):
        part = copy.deepcopy(model)
        keep = {str(i) for i in stage_layers(len(model.layers), num_stages, stage)}
        for layer_id in list(part.layers):
            if layer_id not in keep:
                del part.layers[layer_id]
        if stage != 0:
            part.tok_embeddings = None
        if stage != num_stages - 1:
            part.norm = None
            part.output = None
        parts.append((stage, part))
    return parts


def build_schedule(
    parts: list[tuple[int, nn.Module]], *, num_stages: int, pp_mesh: DeviceMesh, device: torch.device,
    schedule: str, n_microbatches: int, loss_fn,
):
    stages = [
        PipelineStage(module, stage, num_stages, device, group=pp_mesh.get_group()) for stage, module in parts
    ]
    # scale_grads=False: the loss is already normalised by the global token count (see Trainer).
    if schedule == "interleaved_1f1b":
        return _SCHEDULES[schedule](stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    (stage,) = stages
    return _SCHEDULES[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
