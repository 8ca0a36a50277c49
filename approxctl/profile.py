"""Seconds per training step and memory per mode: the paper's Tables 6 and 7 for one model.

A step is forward, cross-entropy, backward and an SGD update on one fixed batch. Each
configuration runs ``warmup`` steps (excluded: allocation, kernel compilation) and reports the
median of ``iters`` steps. All modes are measured in the same run, so the ratios to ``float`` are
what to compare across machines.

Memory: on CUDA, the allocator's peak during a step. On CPU there is no allocator peak to read,
so the figure is the size of the tensors autograd keeps for the backward pass at the end of the
forward — the memory that grows with batch size and that checkpointing reduces.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from approxctl.convert import set_checkpointing, set_mode


@dataclass
class StepStats:
    step_s: float
    peak_mem_mb: float

    def to_json(self) -> dict[str, float]:
        return {"step_s": self.step_s, "peak_mem_mb": self.peak_mem_mb}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_tensor_mb(step: Callable[[], torch.Tensor]) -> float:
    """Bytes of distinct storages autograd saves during ``step``'s forward, in MB."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values()) / 2**20


def time_training_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iters: int,
    warmup: int,
) -> StepStats:
    device = x.device
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        optimizer.zero_grad(set_to_none=True)
        peak = _saved_tensor_mb(forward)
    return StepStats(statistics.median(times), peak)


def profile_modes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iters: int = 5,
    warmup: int = 2,
    checkpointing: bool = True,
) -> dict[str, Any]:
    """Step time and memory in float/exact/inject (and with checkpointing), plus the ratios.

    The model must be converted, calibrated and have fitted error models. Its weights change
    (tiny SGD steps); pass a copy if that matters. Modes and checkpointing are restored.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results: dict[str, StepStats] = {}
    with_ckpt: dict[str, StepStats] = {}
    try:
        for mode in ("float", "exact", "inject"):
            set_mode(model, mode)
            set_checkpointing(model, False)
            results[mode] = time_training_step(model, x, y, iters=iters, warmup=warmup)
            if checkpointing and mode != "float":
                set_checkpointing(model, True)
                with_ckpt[mode] = time_training_step(model, x, y, iters=iters, warmup=warmup)
    finally:
        set_checkpointing(model, False)
        set_mode(model, "float")
        model.load_state_dict(state)
    base = results["float"].step_s
    doc: dict[str, Any] = {
        "modes": {m: s.to_json() for m, s in results.items()},
        "ratios": {m: results[m].step_s / base for m in ("exact", "inject")},
    }
    if with_ckpt:
        doc["checkpointing"] = {m: s.to_json() for m, s in with_ckpt.items()}
        doc["checkpointing_ratios"] = {m: s.step_s / base for m, s in with_ckpt.items()}
    doc["memory"] = "cuda_peak_allocated" if x.device.type == "cuda" else "autograd_saved_tensors"
    return doc
