"""numba's on-disk kernel cache, made safe for processes that compile at the same time.

numba's cache (``cache=True``) is not process safe (numba issue #4807): each process reads the
cache index, picks the first free data-file number for its new signature and rewrites the index.
Two processes compiling at once (the ranks of ``torchrun``, parallel ``approxctl`` jobs, the
first run after an install) can give one file number to two signatures, and a process then loads
machine code compiled for other argument types and crashes (the likely cause of a torchrun rank
of the distributed test dying of SIGABRT on a clean checkout in CI; reproduced here with processes
compiling one cached kernel in different signature orders).

:func:`process_safe` makes a kernel's compile step (cache lookup, compilation, cache write) hold
an exclusive ``flock`` on a lock file in the kernel's cache directory, so the read-modify-write
of the index and the data file written after it happen one process at a time. Calls that find
their signature already compiled in the process never reach the compile step, so they take no
lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: numba's own behaviour
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "approxctl-numba.lock"

Kernel = TypeVar("Kernel")

# Reentrant within the process: compiling one kernel may type (so compile) another.
_thread_lock = threading.RLock()
_depth = 0


def lock_path(kernel: Any) -> str | None:
    """The lock file guarding ``kernel``'s cache directory (None without a disk cache)."""
    cache_path = getattr(getattr(kernel, "_cache", None), "_cache_path", None)
    return None if cache_path is None else os.path.join(cache_path, LOCK_NAME)


@contextmanager
def _exclusive(path: str | None) -> Iterator[None]:
    global _depth
    with _thread_lock:
        if _depth or path is None or fcntl is None:
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # a read-only cache directory: numba will not write there either
            fd = -1
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX)
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
        finally:
            if fd >= 0:
                os.close(fd)  # closing releases the flock


def process_safe(kernel: Kernel) -> Kernel:
    """Decorate a ``numba.njit(cache=True)`` kernel so its compile step locks its cache."""
    compile_: Callable[[Any], Any] = kernel.compile  # type: ignore[attr-defined]
    path = lock_path(kernel)

    def locked_compile(sig: Any) -> Any:
        with _exclusive(path):
            return compile_(sig)

    # numba's dispatcher compiles through ``self.compile``, so the instance attribute wins.
    kernel.compile = locked_compile  # type: ignore[attr-defined]
    return kernel
