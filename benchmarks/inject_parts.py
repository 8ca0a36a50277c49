"""Where an inject step goes: float, inject mode's paths, and (approx-mult) inject without its
error draw, timed round-robin in one process.

    python benchmarks/inject_parts.py [--target am] [--model tinyconv] [--batch-size 128]
                                      [--rounds 15]

Each round runs every configuration for 2 warm-up and 3 timed training steps (forward,
cross-entropy, backward, SGD) on one Fashion-MNIST batch; the table gives each configuration's
median step and the median (first-third quartile) of its per-round ratio to float's.

* approx-mult: "float proxy" turns the fused path off (``ApproxMultTarget.fused_inject``
  returning None: the float32 proxy convolution and the separate in-place draw); "fused" is the
  exact int8 convolution with the draw in its output pass; "fused, no draw" passes it no error
  model: a lower bound, not a mode.
* sc, analog: "float proxy" turns the integer sums off (``ApproxConv2d.integer_sums`` returning
  False: the two float32 convolutions per layer); "integer sums" is inject mode as shipped.

The results of record are in docs/benchmarks.md.
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
from approxctl.layers import ApproxConv2d
from approxctl.models import BUILTIN_MODELS
from approxctl.pipeline import DataOptions
from approxctl.runtime import keep_freed_memory
from approxctl.targets.approx_mult import ApproxMultTarget


def variants(target: str) -> tuple[Any, str, dict[str, Callable[..., Any]]]:
    """(the patched class, its attribute, configuration name -> replacement) for a target."""
    if target == "am":
        fused = ApproxMultTarget.fused_inject
        return ApproxMultTarget, "fused_inject", {
            "float proxy": lambda self, layer, inputs, noise: None,
            "fused": fused,
            "fused, no draw": lambda self, layer, inputs, noise: fused(self, layer, inputs, None),
        }  # fmt: skip
    return ApproxConv2d, "integer_sums", {
        "float proxy": lambda self, x: False,
        "integer sums": ApproxConv2d.integer_sums,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="am", choices=["am", "sc", "analog"])
    parser.add_argument("--model", default="tinyconv", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    x, y = next(iter(DataOptions(batch_size=args.batch_size).load().train))
    model = BUILTIN_MODELS[args.model](in_channels=1, num_classes=10, image_size=32)
    model = convert(model, args.target)
    calibrate(model, [x])
    fit_error_model(model, [x])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    owner, attribute, patches = variants(args.target)
    original = getattr(owner, attribute)
    configs = ["float", *patches]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for _ in range(args.rounds):
            for name in configs:
                set_mode(model, "float" if name == "float" else "inject")
                if name in patches:
                    setattr(owner, attribute, patches[name])
                step()
                step()
                start = time.perf_counter()
                for _ in range(3):
                    step()
                times[name].append((time.perf_counter() - start) / 3)
    finally:
        setattr(owner, attribute, original)
    print(f"{args.model}, {args.target}, batch {args.batch_size}, {args.rounds} rounds")
    print("| configuration | ms per step | ratio to float (per-round quartiles) |")
    print("|---|---|---|")
    for name in configs:
        ratios = [t / f for t, f in zip(times[name], times["float"], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.1f} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")


if __name__ == "__main__":
    main()
