"""In-job restarts: torchrun (`--max-restarts N`: `python -m launch local --max-restarts N`, or
TESSERA_MAX_RESTARTS under Slurm) starts every rank again in place after one fails or the watchdog ends a
hang, and the run resumes from its last committed checkpoint. Rank 0 keeps the last step it completed in
output_dir/.last_step, so that a restart can say how many steps the failure cost."""

import os
from pathlib import Path

from trainer.fault.inject import restart_count

LAST_STEP = ".last_step"


def note_step(output_dir: Path, step: int) -> None:
    """Rank 0, after each step (a write and a rename: a crash never leaves half a number)."""
    tmp = output_dir / f"{LAST_STEP}.tmp"
    tmp.write_text(str(step))
    os.replace(tmp, output_dir / LAST_STEP)


def restart_line(output_dir: Path, resumed: int) -> tuple[str, dict] | None:
    """In an in-job restart: its console line and its record (restart number, steps lost); else None."""
    count = restart_count()
    if count == 0:
        return None
    limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
    try:
        reached = int((output_dir / LAST_STEP).read_text())
    except (OSError, ValueError):
        reached = resumed
    lost = max(0, reached - resumed)
    where = f"resumed from step {resumed}" if resumed else "started again from step 0 (no checkpoint was committed)"
    steps = f"steps {resumed + 1}-{reached} are trained again" if lost > 1 else (
        f"step {reached} is trained again" if lost == 1 else "no step was lost")
    return (f"restart: in-job restart {count} of at most {limit}; {where}; the last run reached step {reached}, "
            f"so {steps} ({lost} lost)", {"restart": count, "steps_lost": lost, "reached": reached})
