"""Where approx-mult's inject step goes: float, the float-proxy path, the fused int8 path, and
the fused path without its error draw, timed round-robin in one process.

    python benchmarks/am_inject_parts.py [--model tinyconv] [--batch-size 128] [--rounds 15]

Each round runs every configuration for 2 warm-up and 3 timed training steps (forward,
cross-entropy, backward, SGD) on one Fashion-MNIST batch; the table gives each configuration's
median step and the median (first-third quartile) of its per-round ratio to float's. "float proxy"
turns the fused path off (``ApproxMultTarget.fused_inject`` returning None: the float32 proxy
convolution and the separate in-place draw), "no draw" passes no error model to the fused path:
a lower bound, not a mode. The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from approxctl import calibrate, convert, fit_error_model, set_mode
from approxctl.models import BUILTIN_MODELS
from approxctl.pipeline import DataOptions
from approxctl.runtime import keep_freed_memory
from approxctl.targets.approx_mult import ApproxMultTarget

CONFIGS = ("float", "float proxy", "fused", "fused, no draw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tinyconv", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    x, y = next(iter(DataOptions(batch_size=args.batch_size).load().train))
    model = BUILTIN_MODELS[args.model](in_channels=1, num_classes=10, image_size=32)
    model = convert(model, "am")
    calibrate(model, [x])
    fit_error_model(model, [x])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    fused = ApproxMultTarget.fused_inject
    variants: dict[str, Callable[..., Any]] = {
        "float proxy": lambda self, layer, inputs, noise: None,
        "fused": fused,
        "fused, no draw": lambda self, layer, inputs, noise: fused(self, layer, inputs, None),
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    try:
        for _ in range(args.rounds):
            for name in CONFIGS:
                set_mode(model, "float" if name == "float" else "inject")
                if name in variants:
                    ApproxMultTarget.fused_inject = variants[name]  # type: ignore[method-assign]
                step()
                step()
                start = time.perf_counter()
                for _ in range(3):
                    step()
                times[name].append((time.perf_counter() - start) / 3)
    finally:
        ApproxMultTarget.fused_inject = fused  # type: ignore[method-assign]
    print(f"{args.model}, batch {args.batch_size}, {args.rounds} rounds")
    print("| configuration | ms per step | ratio to float (per-round quartiles) |")
    print("|---|---|---|")
    for name in CONFIGS:
        ratios = [t / f for t, f in zip(times[name], times["float"], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.1f} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")


if __name__ == "__main__":
    main()
