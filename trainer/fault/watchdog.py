"""Hang detection: a thread on every rank that ends the run when no step completes for fault.hang_timeout_s.

A hung collective otherwise waits for the process group's own timeout (30 minutes on gloo, 10 on NCCL) and
leaves no trace of where each rank was. When the watchdog fires, each rank
  1. writes every thread's Python stack (faulthandler) to output_dir/hangs/step-N/rank-R.txt, and on NCCL
     torch's flight recorder (the collectives each rank had issued and completed) beside it;
  2. says through the rendezvous store (the TCP store torchrun started, not the hung process group) whether
     its main thread was waiting in a collective or elsewhere, and where;
  3. the first rank to hear from every rank (or from all that answer within a few seconds) prints one line:
     the step, the ranks that had not arrived (not in a collective: the ones the others wait for) and where;
  4. rank 0 writes output_dir/HUNG for the launchers, and every rank exits with EXIT_HUNG (os._exit: the main
     thread is stuck and cannot unwind).
A completed checkpoint is never at risk: a save cut short is no checkpoint (trainer/checkpoint/manifest.py).
"""

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from trainer.fault import EXIT_HUNG, HUNG_MARKER

_ANSWER_WAIT_S = 10.0  # how long a rank waits for the others' answers once it has fired


_REPO = str(Path(__file__).resolve().parents[2]) + os.sep


def main_thread_place() -> tuple[bool, str]:
    """(waiting in a collective, 'function (file:line)' of the main thread's innermost frame in this
    repository, else its innermost frame): a rank blocked in torch.distributed has arrived; any other rank
    is what they wait for."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    waiting, ours, innermost = False, None, None
    while frame is not None:
        path = frame.f_code.co_filename
        waiting = waiting or f"{os.sep}torch{os.sep}distributed{os.sep}" in path
        here = f"{frame.f_code.co_name} ({path.removeprefix(_REPO)}:{frame.f_lineno})"
        innermost = innermost or here
        if ours is None and path.startswith(_REPO) and "site-packages" not in path:  # not a venv inside the repo
            ours = here
        frame = frame.f_back
    return waiting, ours or innermost or "?"


class HangWatchdog:
    def __init__(self, timeout_s: float, output_dir: Path, rank: int, world_size: int, device_type: str):
        self.timeout_s, self.output_dir, self.rank, self.world = timeout_s, Path(output_dir), rank, world_size
        self.device_type = device_type
        self.step = 0  # the last step completed
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.thread = None

    def start(self, step: int) -> None:
        if self.timeout_s <= 0:
            return
        self.progress(step)
        self.thread = threading.Thread(target=self._watch, name="tessera-hang-watchdog", daemon=True)
        self.thread.start()

    def progress(self, step: int) -> None:
        """A step (or its validation, or its checkpoint) completed."""
        self.step, self.last = step, time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self.stopped.wait(poll):
            if time.monotonic() - self.last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        step, idle = self.step + 1, time.monotonic() - self.last
        folder = self.output_dir / "hangs" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        waiting, place = main_thread_place()
        stacks = folder / f"rank-{self.rank}.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank}: no step completed for {idle:.0f} s (step {step}); main thread "
                    f"{'waiting in a collective' if waiting else 'not in a collective'}, in {place}\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        self._flight_recorder(folder)
        answers = self._exchange(step, waiting, place)
        if min(answers, default=self.rank) == self.rank:
            print(self._summary(step, idle, answers, folder), file=sys.stderr, flush=True)
        if self.rank == 0:
            (self.output_dir / HUNG_MARKER).write_text(f"step {step}\n")
        sys.stdout.flush()
        os._exit(EXIT_HUNG)

    def _flight_recorder(self, folder: Path) -> None:
        """NCCL's record of each rank's collectives (what was issued, what completed): torch's own dump."""
        if self.device_type != "cuda":
            return
        import torch

        dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace", None) or getattr(
            torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if dump is not None:
            try:
                (folder / f"rank-{self.rank}.flight-recorder.pickle").write_bytes(dump())
            except Exception as e:  # a dump that fails must not keep the run from ending
                print(f"rank {self.rank}: no flight-recorder dump ({e})", file=sys.stderr, flush=True)

    def _exchange(self, step: int, waiting: bool, place: str) -> dict[int, str]:
        """Every rank's answer ('waiting|place' or 'busy|place') through the rendezvous store, by rank."""
        mine = f"{'waiting' if waiting else 'busy'}|{place}"
        store = self._store()
        if store is None:
            return {self.rank: mine}
        prefix = f"tessera/hang/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/step-{step}/rank-"
        try:
            store.set(f"{prefix}{self.rank}", mine)
            deadline = time.monotonic() + _ANSWER_WAIT_S
            while time.monotonic() < deadline and not store.check([f"{prefix}{r}" for r in range(self.world)]):
                time.sleep(0.2)
            return {r: store.get(f"{prefix}{r}").decode() for r in range(self.world) if store.check([f"{prefix}{r}"])}
        except Exception:  # the store itself gone (its host died): each rank speaks for itself
            return {self.rank: mine}

    def _store(self):
        if self.world == 1:
            return None
        import torch.distributed as dist

        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:
            return None

    def _summary(self, step: int, idle: float, answers: dict[int, str], folder: Path) -> str:
        late = {r: a.split("|", 1)[1] for r, a in answers.items() if a.startswith("busy")}
        silent = [r for r in range(self.world) if r not in answers]
        waiting = sorted(r for r, a in answers.items() if a.startswith("waiting"))
        parts = [f"hang: no step completed for {idle:.0f} s (fault.hang_timeout_s={self.timeout_s:g}) at step {step}"]
        if self.world > 1:
            parts.append("ranks not in a collective (the others wait for them): "
                         + (", ".join(f"{r} in {p}" for r, p in sorted(late.items())) or "none"))
            if waiting:
                parts.append(f"waiting in a collective: {_ranges(waiting)}")
            if silent:
                parts.append(f"no answer (dead or frozen): {_ranges(silent)}")
        else:
            parts.append(f"in {next(iter(answers.values())).split('|', 1)[1]}")
        parts.append(f"stacks under {folder}; exiting with code {EXIT_HUNG}")
        return "; ".join(parts)


def _ranges(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
