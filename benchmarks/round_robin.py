"""Timing shared by the round-robin benchmarks (``inject_parts.py``, ``memory_format.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

WARMUP_STEPS = 2
TIMED_STEPS = 3


def seconds_per_step(step: Callable[[], None]) -> float:
    """One configuration's turn in a round: WARMUP_STEPS untimed steps (caches, allocator,
    thread pools back to this configuration), then the mean of TIMED_STEPS timed ones."""
    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    return (time.perf_counter() - start) / TIMED_STEPS
