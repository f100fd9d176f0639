"""Expert parallelism: each of the ep ranks holds num_experts / ep of every MoE layer's experts (the stacked
weights become DTensors sharded over the experts), and the tokens routed to an expert travel to the rank
that holds it and back, by two all-to-alls with variable splits per MoE layer (and two more in the
backward, which autograd derives).

Each rank routes its own tokens (the router is an ordinary data-parallel parameter), sorts the (token,
choice) pairs by expert (models/common/moe.py), and hands them here with the count per expert:

1. the counts go round first (an all-to-all of num_experts numbers), so each rank knows how many rows it
   sends to and receives from every other;
2. the rows go out: a rank receives, from each source rank in turn, the rows for its own experts, grouped
   by expert within each source;
3. they are regrouped by expert (all sources' rows for expert 0, then expert 1, ...), run through the
   local experts' grouped matmul, put back in arrival order, and sent home by the reverse all-to-all.

Dropless, like the layer itself: no capacity, so the splits vary per step; the split sizes are read on the
host (a synchronisation torchtitan and Megatron make too), so this step runs outside compiled graphs.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


class ExpertParallel:
    """The dispatch of one MoE layer (models/common/moe.py: MoE.dispatch) over an ep mesh."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh, self.size = mesh, mesh.size()
        self.group = mesh.get_group()

    @torch.compiler.disable
    def __call__(self, experts: nn.Module, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (routed rows, dim) sorted by expert, counts (num_experts,) of them per expert -> the experts'
        outputs for those rows, in the same order."""
        local = counts.numel() // self.size
        sent = counts.view(self.size, local)  # sent[r, e]: rows for rank r's local expert e
        received = torch.empty_like(sent)  # received[r, e]: rows from rank r for this rank's expert e
        dist.all_to_all_single(received, sent, group=self.group)
        send_splits, recv_splits = sent.sum(1).tolist(), received.sum(1).tolist()
        arrived = all_to_all_single_autograd(x, recv_splits, send_splits, group=self.group)
        order = _by_expert(received)
        out = experts(arrived[order], received.sum(0))
        back = out[torch.argsort(order)]  # arrival order again
        return all_to_all_single_autograd(back, send_splits, recv_splits, group=self.group)


def _by_expert(received: torch.Tensor) -> torch.Tensor:
    """The rows arrive grouped by source rank, then by expert (chunks of received[r, e] rows); the indices
    that regroup them by expert, then source rank."""
    sizes = received.flatten()
    starts = (torch.cumsum(sizes, 0) - sizes).view_as(received)
    by_expert_sizes, by_expert_starts = received.t().flatten(), starts.t().flatten()
    position = torch.arange(int(sizes.sum()), device=received.device)
    chunk_start = torch.cumsum(by_expert_sizes, 0) - by_expert_sizes
    return position + torch.repeat_interleave(by_expert_starts - chunk_start, by_expert_sizes)


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shards every MoE layer's stacked expert tensors over the ep ranks by expert (on the meta device,
    before materialization, so each rank only ever allocates its own experts), and gives each layer the
    all-to-all dispatch."""
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if moe is None:
            continue
        experts = moe.experts
        # Every tensor stacked over the experts: the weights, and adapters' tensors over them.
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        moe.dispatch = ExpertParallel(mesh)
