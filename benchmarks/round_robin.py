"""What the benchmarks share: timing round-robin (``inject_parts.py``, ``memory_format.py``;
alternated calls for ``patch_grad.py``, ``pair_backward.py``),
one Fashion-MNIST batch with a built-in model (``inject_parts.py``, ``direct_convs.py``,
``memory_format.py``, ``layer_costs.py``) and that model made ready for exact and inject steps
(``inject_parts.py``, ``layer_costs.py``)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import safetensors.torch
import torch

import approxctl
from approxctl.models import BUILTIN_MODELS
from approxctl.pipeline import DataOptions
from approxctl.runtime import keep_freed_memory
from approxctl.sources import load_weights_into

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


def alternated_medians(
    calls: dict[str, Callable[[], object]], turns: int, per_turn: int
) -> dict[str, float]:
    """Each callable's median milliseconds per call over ``turns`` turns in which they take
    their ``per_turn`` calls in alternation (two ways of doing one thing, timed on a shared
    machine whose speed drifts): ``patch_grad.py``, ``pair_backward.py``."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(turns):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(per_turn):
                call()
            times[name].append((time.perf_counter() - start) / per_turn * 1000)
    return {name: statistics.median(series) for name, series in times.items()}


def add_batch_and_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--batch-size`` and ``--weights``: what ``batch_and_model`` takes."""
    parser.add_argument("--model", default="tinyconv", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--weights", help="float weights (.safetensors) to start from; default: random init"
    )


def ready_to_train(
    model: torch.nn.Module, target: str, x: torch.Tensor, package: ModuleType = approxctl
) -> torch.nn.Module:
    """``model`` converted for ``target``, calibrated and its error models fitted on the batch
    ``x``, in training mode: what exact and inject steps need. ``package``: the approxctl to
    do it with (``versus_commit.py`` passes an earlier commit's)."""
    model = package.convert(model, target)
    package.calibrate(model, [x])
    package.fit_error_model(model, [x])
    return model.train()


def batch_and_model(
    model_name: str, batch_size: int, weights: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The command line's process settings, seed 0, one training batch of Fashion-MNIST and the
    built-in model for it, with the float ``weights`` (.safetensors) if given."""
    keep_freed_memory()
    torch.manual_seed(0)
    x, y = next(iter(DataOptions(batch_size=batch_size).load().train))
    model = BUILTIN_MODELS[model_name](in_channels=1, num_classes=10, image_size=32)
    if weights:
        load_weights_into(model, safetensors.torch.load_file(weights), weights)
    return x, y, model
