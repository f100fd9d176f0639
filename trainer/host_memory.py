"""Training on CPU: glibc's malloc keeps freed memory for the next step (training.cpu_malloc=retain).

glibc returns every freed block over its mmap threshold (32 MiB at most, so every weight gradient of a
large vocabulary, the logits, the optimizer's temporaries) and the free top of its heap to the kernel. A
CPU training step frees and allocates the same activations and gradients every step, so each step
mapped, faulted in and zeroed them again: on the 2-core benchmark machine that was a third of the step
in the kernel (docs/performance.md). With mmap and trimming off, freed blocks stay in the heap and the
next step reuses them. The price is that the process keeps its high-water mark (plus fragmentation)
instead of shrinking between steps; the peak it reaches within a step is the same.
"""

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Tells glibc's malloc never to mmap blocks nor to trim the heap; False where the C library is
    not glibc (musl, macOS), which keeps its own behaviour."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # Blocks already mmapped (the ones allocated before this call) are still unmapped when freed.
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
