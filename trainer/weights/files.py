"""File modes of what we write for others to read."""

import os
import re
from pathlib import Path


def _umask() -> int:
    # Read, not set and restored: os.umask would open a window in which another thread's new files
    # (the checkpoint committer's) get mode 0666.
    try:
        return int(re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError):
        return 0o022


def readable(path: Path) -> None:
    """The mode a plain open() would give under the process's umask (0644 under the usual 022):
    safetensors creates its files 0600, which others on a shared cluster cannot read."""
    os.chmod(path, 0o666 & ~_umask())
