"""numba's disk cache under processes that compile at the same time (numba issue #4807)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numba
import pytest

import approxctl
from approxctl.backends import cpu_kernels, cpu_pointwise
from approxctl.backends.numba_cache import LOCK_NAME

REPO = Path(approxctl.__file__).resolve().parent.parent

# A cached kernel compiled for many signatures: without the lock, two processes compiling at
# once give one cache file to two signatures and load each other's machine code.
KERNEL = """
import numba
from approxctl.backends.numba_cache import process_safe

@process_safe
@numba.njit(cache=True)
def total(a):
    s = a[0] * 0
    for i in range(a.shape[0]):
        s += a[i] * 2
    return s
"""

WORKER = """
import sys
import numpy as np
import kern

dtypes = [np.float32, np.float64, np.int64, np.int32, np.int16, np.uint16, np.uint32, np.int8]
first = int(sys.argv[1])
for dtype in dtypes[first:] + dtypes[:first]:  # every process compiles in its own order
    for step in (1, 2):
        a = np.arange(0, 10 * step, step, dtype=dtype)  # C and A (strided) layouts
        assert int(kern.total(a)) == 90 * step, (dtype, step)
print("ok")
"""


def _write_module(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "kern.py").write_text(textwrap.dedent(KERNEL))
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def test_processes_compiling_at_once_share_the_cache_safely(tmp_path: Path) -> None:
    env = _write_module(tmp_path)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    workers = [
        subprocess.Popen([sys.executable, "worker.py", str(i)], cwd=tmp_path, env=env, **pipes)
        for i in range(4)
    ]
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0 and out.strip() == "ok", err[-1500:]
    # A fresh process loads every signature from the cache the four of them wrote.
    again = subprocess.run(
        [sys.executable, "worker.py", "0"], cwd=tmp_path, env=env, text=True, capture_output=True
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-1500:]


def test_compiling_waits_for_the_lock_held_by_another_process(tmp_path: Path) -> None:
    env = _write_module(tmp_path)
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    marker = tmp_path / "compiling"
    script = (
        "import pathlib, numpy as np, kern\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "print(kern.total(np.arange(4.0)))\n"
    )
    with open(cache / LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        child = subprocess.Popen(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3.0)  # compiling this kernel takes well under a second once numba is loaded
        blocked = child.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
    out, err = child.communicate(timeout=120)
    assert blocked, f"compiled while another process held the cache lock: {out} {err[-500:]}"
    assert child.returncode == 0 and float(out) == 12.0, err[-1500:]


@pytest.mark.parametrize("module", [cpu_kernels, cpu_pointwise])
def test_every_disk_cached_kernel_compiles_under_the_lock(module: object) -> None:
    kernels = [
        value for value in vars(module).values()
        if isinstance(value, numba.core.registry.CPUDispatcher)
        and type(value._cache).__name__ != "NullCache"
    ]  # fmt: skip
    assert kernels
    for kernel in kernels:
        assert "compile" in vars(kernel), f"{kernel.__name__} lacks @process_safe"
