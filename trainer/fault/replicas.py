"""Replica groups that survive a failure (fault.replica_groups > 1), through torchft.

Each replica group is a job of its own (its own torchrun, its own ranks, FSDP2 / TP / PP inside it as the
config says) holding a whole copy of the model. The groups meet through torchft: a Lighthouse decides each
step which groups take part (the quorum), a Manager in every rank averages that rank's gradients with the
same rank of every other participating group (torchft's fault-tolerant all-reduce over its own gloo or NCCL
process group, rebuilt when the quorum changes), and commits the step only where every rank of the group
succeeded. A group that fails drops out of the quorum; the others keep stepping without it. A group that
comes back (restarted by its launcher, resumed from its own last checkpoint) is behind: at its first step
the Manager fetches the current weights, optimizer state, schedule and step counter from a live peer (over
HTTP), and it steps with the others from there.

What a step means when a group drops: that step's gradient is the average over the groups that took part,
so it saw fewer samples; the lost group's batches of the steps it missed are not trained (its data position
is its own, from its checkpoint). Checkpoints: each group writes its own (job.output_dir/replica-I), and
any group's checkpoint resumes any group.
"""

import os
import warnings
from datetime import timedelta

import torch
from torch.distributed.tensor import DTensor

# What a recovering group takes from a live peer: the training state, not the data position (each group
# reads its own share of the data) nor the RNG (each group draws its own dropout).
RECOVERED = ("model", "optimizer", "lr_scheduler", "train")


def _local(tree):
    """The state with every DTensor as its local shard (what crosses to a peer with the same layout)."""
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, DTensor):
        return tree.to_local().detach().clone()
    if torch.is_tensor(tree):
        return tree.detach().clone()
    return tree


def _like(received, live):
    """A peer's state in this rank's own tensors' layouts (the same layout: its local shards are ours)."""
    if isinstance(live, dict):
        return {k: _like(received[k], v) for k, v in live.items() if k in received}
    if isinstance(live, DTensor):
        return DTensor.from_local(received.to(live.device), live.device_mesh, live.placements,
                                  shape=live.shape, stride=live.stride())
    if torch.is_tensor(live):
        return received.to(live.device)
    return received


class ReplicaGroups:
    """This rank's Manager: one quorum per step, the gradient average, the commit, and recovery."""

    def __init__(self, cfg, state: dict, rank: int, world_size: int, device: torch.device, step: int):
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust side logs every quorum at info level
        # torchft reads a peer's state from a read-only buffer; nothing writes to it before it is copied in.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        from torchft import Manager, ProcessGroupGloo

        self.state = state  # name -> Stateful, the checkpoint's (trainer._checkpoint_state)
        lighthouse = cfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
        if device.type == "cuda":
            from torchft import ProcessGroupBabyNCCL as GroupClass
        else:
            GroupClass = ProcessGroupGloo
        store_addr, store_port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        self._store = None
        if store_addr is None:  # one process without torchrun: the group's store is ours
            from torch.distributed import TCPStore

            self._store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = "localhost", self._store.port
        timeout = timedelta(seconds=cfg.replica_timeout_s)
        self.manager = Manager(
            pg=GroupClass(timeout=timeout), min_replica_size=cfg.min_replicas, load_state_dict=self._load,
            state_dict=self._save, replica_id=f"tessera-replica-{cfg.replica_id}", lighthouse_addr=lighthouse,
            store_addr=store_addr, store_port=int(store_port), rank=rank, world_size=world_size,
            use_async_quorum=False, timeout=timeout, quorum_timeout=timeout,
        )
        # A resumed group starts from its checkpoint's step; the quorum then says whether it is behind.
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        self.recovered_from: int | None = None

    def _save(self) -> dict:
        return {name: _local(self.state[name].state_dict()) for name in RECOVERED}

    def _load(self, received: dict) -> None:
        for name in RECOVERED:
            self.state[name].load_state_dict(_like(received[name], self.state[name].state_dict()))
        self.recovered_from = int(received["train"]["step"])

    def recovery_note(self, group: int, step: int) -> str | None:
        """The console line after a step in which this group took a peer's state (once), else None."""
        taken, self.recovered_from = self.recovered_from, None
        if taken is None:
            return None
        if taken == 0:
            return f"replicas: group {group} starts from a peer's state (torchft makes every group start alike)"
        return (f"replicas: group {group} was behind; it took a live peer's state at step {taken} and steps with "
                f"the others from step {step}")

    def start_step(self) -> None:
        """The quorum of this step, before the forward (a group behind the others is marked for recovery)."""
        self.manager.start_quorum()

    @torch.no_grad()
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Each gradient, averaged with the same rank of every participating group (torchft's all-reduce:
        a group that is recovering contributes zeros and is not counted)."""
        works = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            works.append(self.manager.allreduce(grad))
        for work in works:
            work.wait()

    def should_commit(self) -> bool:
        """Every rank of the group agrees whether this step stands (a recovering group loads its peer's
        state here, before its first committed step)."""
        return self.manager.should_commit()

    @property
    def step(self) -> int:
        return self.manager.current_step()

    @property
    def participants(self) -> int:
        return self.manager.num_participants()

    def close(self) -> None:
        self.manager.shutdown(wait=False)
