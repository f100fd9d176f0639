"""Preemption: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) asks every rank to finish its step, save a checkpoint
and exit. A second Ctrl-C stops at once (exit 130), keeping the last complete checkpoint: the process
exits from the handler, since an exception raised there could land anywhere (inside torch's checkpoint
writer, which wraps it into an error of its own, or in a `finally` on the way out).

The handler only sets a flag. At the end of each step the ranks agree (a max over the world) so that
they all stop after the same step, even when the signal reached them at different moments.
"""

import os
import signal
import sys

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later". `python train.py` exits with it; torchrun turns any worker failure
# into its own exit code 1, so launchers also find job.output_dir/PREEMPTED, which names the step.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # a second Ctrl-C: 128 + SIGINT, as shells report it
MARKER = "PREEMPTED"


def stop_at_once(is_main: bool, when: str = "") -> None:
    """Ctrl-C's hard stop. Checkpoints are published whole (trainer/checkpoint/manifest.py), so one cut
    short is never taken for complete and the last complete one stays."""
    if is_main:
        print(f"\nstopped at once by Ctrl-C{when}: nothing more was saved; the last complete checkpoint stays",
              file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


class Preempted(Exception):
    def __init__(self, step: int, signum: int, saved: bool, unsaved_because: str = "checkpoint.enabled=false"):
        what = "a checkpoint was saved" if saved else f"no checkpoint was saved ({unsaved_because})"
        how = "interrupted by SIGINT (Ctrl-C)" if signum == signal.SIGINT else f"preempted by {signal.Signals(signum).name}"
        super().__init__(f"{how} after step {step}; {what}")
        self.step, self.signum = step, signum


_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionWatch:
    """Installs the handlers for a run's life; restore() gives the process its own back (in-process runs)."""

    def __init__(self, device: torch.device, is_main: bool = True):
        self.device, self.is_main = device, is_main
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            stop_at_once(self.is_main)
        if signum == signal.SIGINT and self.is_main:
            print("\ninterrupted: the step finishes, a checkpoint is saved, then the run stops (Ctrl-C again: stop "
                  "at once, keeping the last complete checkpoint)", file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed_signal(self) -> int:
        """The signal any rank received (0 if none): the same answer on every rank."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
