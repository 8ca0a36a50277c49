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


def paired_ratio_quartiles(times: list[float], base_times: list[float]) -> list[float]:
    """First and third quartile of the per-round ratios ``times[i] / base_times[i]``.

    Every configuration runs once per round, one after another, so a slow moment of a shared
    machine moves the steps of a round together; the spread of the paired ratios says how far
    one run's ratio can be trusted (on the virtual machines this project measures on, the
    absolute times of one command swing by up to 20%)."""
    ratios = [t / b for t, b in zip(times, base_times, strict=True)]
    if len(ratios) == 1:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]


def unsteady_ratios(result: dict[str, Any]) -> list[str]:
    """The configurations of a ``profile_modes`` result whose ratio (median step over float's
    median step) lies outside the middle half of its per-round ratios: the machine's speed moved
    during the run, so the per-round range says more than that ratio (on a shared VM, a slow
    stretch of float steps alone once put analog's inject ratio at 1.10 while its rounds read
    1.13-1.23)."""
    found = []
    groups = (("ratios", "ratio_quartiles", ""), ("checkpointing_ratios",
              "checkpointing_ratio_quartiles", " + checkpointing"))  # fmt: skip
    for ratios, quartiles, suffix in groups:
        for mode, ratio in result.get(ratios, {}).items():
            low, high = result[quartiles][mode]
            if not low <= ratio <= high:
                found.append(mode + suffix)
    return found


class _Stepper:
    """One training configuration (mode, checkpointing) of a model on a fixed batch."""

    def __init__(self, model: nn.Module, mode: str, checkpointing: bool) -> None:
        self.model, self.mode, self.checkpointing = model, mode, checkpointing
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        self.times: list[float] = []

    def configure(self) -> None:
        set_mode(self.model, self.mode)
        set_checkpointing(self.model, self.checkpointing)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.configure()
        _sync(x.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss(x, y).backward()
        self.optimizer.step()
        _sync(x.device)
        return time.perf_counter() - start

    def memory_mb(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.configure()
        self.optimizer.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(x.device)
            self.loss(x, y).backward()
            _sync(x.device)
            return torch.cuda.max_memory_allocated(x.device) / 2**20
        return _saved_tensor_mb(lambda: self.loss(x, y))


def profile_modes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    iters: int = 7,
    warmup: int = 2,
    checkpointing: bool = True,
) -> dict[str, Any]:
    """Step time and memory in float/exact/inject (and with checkpointing), plus the ratios.

    Configurations are timed round-robin (one step of each per round), so a slow moment of a
    shared machine hits all of them alike; each reports the median of ``iters`` rounds after
    ``warmup`` rounds. The model must be converted, calibrated and have fitted error models. Its
    weights, modes and checkpointing are restored afterwards.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    configs = {mode: _Stepper(model, mode, False) for mode in ("float", "exact", "inject")}
    if checkpointing:
        configs |= {f"{m}+ckpt": _Stepper(model, m, True) for m in ("exact", "inject")}
    try:
        for round_ in range(warmup + iters):
            for stepper in configs.values():
                seconds = stepper.step(x, y)
                if round_ >= warmup:
                    stepper.times.append(seconds)
        memory = {name: stepper.memory_mb(x, y) for name, stepper in configs.items()}
    finally:
        set_checkpointing(model, False)
        set_mode(model, "float")
        model.load_state_dict(state)
    stats = {
        name: StepStats(statistics.median(stepper.times), memory[name])
        for name, stepper in configs.items()
    }
    base = stats["float"].step_s
    doc: dict[str, Any] = {
        "modes": {m: stats[m].to_json() for m in ("float", "exact", "inject")},
        "ratios": {m: stats[m].step_s / base for m in ("exact", "inject")},
        "ratio_quartiles": {
            m: paired_ratio_quartiles(configs[m].times, configs["float"].times)
            for m in ("exact", "inject")
        },
    }
    if checkpointing:
        doc["checkpointing"] = {m: stats[f"{m}+ckpt"].to_json() for m in ("exact", "inject")}
        doc["checkpointing_ratios"] = {
            m: stats[f"{m}+ckpt"].step_s / base for m in ("exact", "inject")
        }
        doc["checkpointing_ratio_quartiles"] = {
            m: paired_ratio_quartiles(configs[f"{m}+ckpt"].times, configs["float"].times)
            for m in ("exact", "inject")
        }
    doc["memory"] = "cuda_peak_allocated" if x.device.type == "cuda" else "autograd_saved_tensors"
    return doc
