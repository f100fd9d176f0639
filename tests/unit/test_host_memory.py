"""training.cpu_malloc=retain: freed tensors stay in the process for the next step instead of going back to
the kernel (and being faulted in again). Measured on the real C library, in fresh processes."""

import platform
import subprocess
import sys

import pytest

from tests.helpers import REPO

PROBE = """
import sys, torch
from trainer.host_memory import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.ones(1024).sum()  # torch's first operation loads and allocates what it needs: not part of the measurement
before = rss_mib()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, over glibc's largest mmap threshold
del x
print(retained, rss_mib() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_retain_keeps_freed_memory_and_system_returns_it():
    kept = {}
    for mode in ("retain", "system"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
        retained, grown = out.stdout.split()
        kept[mode] = float(grown)
        assert retained == str(mode == "retain")
    assert kept["retain"] > 60, kept  # the 64 MiB block is still the process's after the free
    assert kept["system"] < 8, kept  # glibc unmapped it
