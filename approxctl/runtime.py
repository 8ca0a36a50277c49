"""Process-wide CPU settings that make training steps faster, applied by the command line.

``keep_freed_memory()``: glibc returns large freed blocks to the kernel (each allocation above
the mmap threshold is a fresh mapping, and trimming gives the top of the heap back), so every
training step pays page faults again for its activation-sized tensors. On the virtual machines
this project measures on, a fresh 16 MB buffer costs about as much as the kernel that fills it.
Raising the thresholds lets freed blocks be reused, the same effect PyTorch's CPU tuning guide
gets from preloading jemalloc or tcmalloc. The process keeps its peak memory instead of
returning it, which a training run would reach again at its next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest allowed value on 64-bit systems
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes
ENV_OPT_OUT = "APPROXCTL_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where that is not possible
    (another libc, or ``APPROXCTL_KEEP_FREED_MEMORY=0``)."""
    if os.environ.get(ENV_OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    done &= mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    done &= mallopt(_M_TOP_PAD, 64 << 20)
    return bool(done)
