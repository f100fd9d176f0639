"""Preemption: SIGTERM or SIGUSR1 asks every rank to finish its step, save a checkpoint and exit.

The handler only sets a flag. At the end of each step the ranks agree (a max over the world) so that
they all stop after the same step, even when the signal reached them at different moments.
"""

import signal

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". `python train.py` exits with it; torchrun turns any worker failure
# into its own exit code 1, so launchers also find job.output_dir/PREEMPTED, which names the step.
EXIT_PREEMPTED = 75
MARKER = "PREEMPTED"


class Preempted(Exception):
    def __init__(self, step: int, signum: int, saved: bool, unsaved_because: str = "checkpoint.enabled=false"):
        what = "a checkpoint was saved" if saved else f"no checkpoint was saved ({unsaved_because})"
        super().__init__(f"preempted by {signal.Signals(signum).name} after step {step}; {what}")
        self.step, self.signum = step, signum


class PreemptionWatch:
    def __init__(self, device: torch.device):
        self.device = device
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed_signal(self) -> int:
        """The signal any rank received (0 if none): the same answer on every rank."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
