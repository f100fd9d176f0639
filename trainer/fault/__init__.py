"""What a run does about the failures a cluster has: a rank that hangs (watchdog.py), a rank that runs slow
(stragglers.py), an in-job restart's bookkeeping (restarts.py), and faults injected on purpose so that
tests need no broken hardware (inject.py). docs/fault_tolerance.md says how they fit with the launchers."""

# `python train.py` exits with it when the watchdog ends a hung run (the number coreutils' `timeout` uses).
EXIT_HUNG = 124
# Written by rank 0 beside the checkpoints when the watchdog ends a run: launchers read it (torchrun turns
# every worker failure into exit code 1) to treat the failure as transient.
HUNG_MARKER = "HUNG"
# Written by rank 0 when the run fails of itself (a config, data or checkpoint error; divergence): no restart
# or requeue can mend it, and the launchers do not try.
FAILED_MARKER = "FAILED"
