"""Where checkpoints live and which of them are complete.

A checkpoint is written to `checkpoints/step-N.partial/` and renamed to `checkpoints/step-N/` only once
every rank has finished writing it, so a directory named step-N is always complete. Anything ending in
.partial was interrupted: it is never loaded and is removed at the next start.
"""

import re
import shutil
from pathlib import Path

PARTIAL = ".partial"
_STEP = re.compile(r"step-(\d+)")


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}{PARTIAL}"


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP.fullmatch(child.name)
        if m and child.is_dir() and (child / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step_dir(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def remove_partials(root: Path) -> list[Path]:
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith(PARTIAL):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def step_of(path: Path) -> int | None:
    m = _STEP.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def earlier_hint(path: Path, root: Path) -> str:
    step = step_of(path)
    earlier = [s for s in complete_steps(root) if step is None or s < step]
    if earlier:
        return f"The previous complete checkpoint is {step_dir(root, earlier[-1])}: resume from it with checkpoint.resume_from=<that path>"
    return "No earlier complete checkpoint exists; start over with checkpoint.resume_from=none"
