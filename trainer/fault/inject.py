"""Faults on purpose (fault.inject), for the tests of the watchdog, in-job restarts and straggler warnings:

    hang:rank=R:step=N     rank R stops making progress at the start of step N (sleeps for ever)
    crash:rank=R:step=N    rank R dies at the start of step N (SIGKILL: no handler, no exit code of ours)
    slow:rank=R:factor=F   rank R computes F times as long each step (burns CPU after its backward)

each optionally `:replica=I` (only in replica group I, with fault.replica_groups) and `:restart=K`: only in
torchrun's in-job restart K (TORCHELASTIC_RESTART_COUNT; default 0,
the first start), so that a restarted run goes past the fault. A fresh Slurm requeue counts from 0 again.
Refused unless TESSERA_DEBUG_FAULTS=1 is set: a config copied from a test must not hang a real run.

Standard library only: the config checks parse these before torch is loaded."""

import os
import signal
import time
from dataclasses import dataclass

from trainer.errors import ConfigError

ENABLE = "TESSERA_DEBUG_FAULTS"
_KEYS = {"hang": ("rank", "step"), "crash": ("rank", "step"), "slow": ("rank", "factor")}


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = 0
    factor: float = 1.0
    restart: int = 0
    replica: int | None = None  # None: in every replica group


def parse_fault(text: str) -> Fault:
    """One fault.inject entry; ConfigError naming it and the form expected."""
    form = ("expected hang:rank=R:step=N, crash:rank=R:step=N or slow:rank=R:factor=F, each optionally :replica=I "
            "and :restart=K")
    kind, *parts = text.split(":")
    if kind not in _KEYS:
        raise ConfigError(f"fault.inject entry {text!r}: unknown fault {kind!r}; {form}")
    try:
        fields = dict(part.split("=", 1) for part in parts)
    except ValueError:
        raise ConfigError(f"fault.inject entry {text!r}: each part after the kind is key=value; {form}") from None
    wanted = set(_KEYS[kind]) | {"restart", "replica"}
    if set(fields) - wanted or not set(_KEYS[kind]) <= set(fields):
        raise ConfigError(f"fault.inject entry {text!r}: {kind} takes {', '.join(_KEYS[kind])} (and optionally replica, restart); {form}")
    try:
        fault = Fault(kind, rank=int(fields["rank"]), step=int(fields.get("step", 0)),
                      factor=float(fields.get("factor", 1.0)), restart=int(fields.get("restart", 0)),
                      replica=int(fields["replica"]) if "replica" in fields else None)
    except ValueError:
        raise ConfigError(f"fault.inject entry {text!r}: rank, step and restart are integers, factor a number; {form}") from None
    if fault.rank < 0 or fault.restart < 0 or (kind != "slow" and fault.step < 1) or (kind == "slow" and not fault.factor > 1):
        raise ConfigError(f"fault.inject entry {text!r}: rank and restart must be >= 0, step >= 1, factor > 1")
    return fault


def check_faults(entries: list[str], steps: int) -> list[Fault]:
    faults = [parse_fault(entry) for entry in entries]
    if faults and os.environ.get(ENABLE) != "1":
        raise ConfigError(f"fault.inject={entries} injects faults on purpose (for tests): set {ENABLE}=1 in the "
                          f"environment to allow it, or remove fault.inject")
    late = [f for f in faults if f.kind != "slow" and f.step > steps]
    if late:
        raise ConfigError(f"fault.inject: step {late[0].step} is past training.steps={steps}, so the fault would never happen")
    return faults


def restart_count() -> int:
    """torchrun's in-job restart number (0: the first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Injector:
    """The faults of this rank in this start."""

    def __init__(self, entries: list[str], rank: int, steps: int, replica: int = 0):
        now = restart_count()
        self.faults = [f for f in check_faults(entries, steps)
                       if f.rank == rank and f.restart == now and f.replica in (None, replica)]
        self._cpu = time.process_time()

    def before_step(self, step: int) -> None:
        self._cpu = time.process_time()
        for fault in self.faults:
            if fault.step == step and fault.kind == "hang":
                injected_hang()
            if fault.step == step and fault.kind == "crash":
                os.kill(os.getpid(), signal.SIGKILL)

    def after_compute(self) -> None:
        """A slow rank computes (factor - 1) times as long again as its step has so far (CPU time)."""
        for fault in self.faults:
            if fault.kind == "slow":
                burn_cpu((fault.factor - 1) * (time.process_time() - self._cpu))


def injected_hang() -> None:
    """A hang: the stack files name this function."""
    while True:
        time.sleep(1)


def burn_cpu(seconds: float) -> None:
    """Busy, not asleep: a slow device's rank computes longer, which process CPU time counts."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
