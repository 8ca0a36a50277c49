"""Where an inject step goes: float, inject mode's paths, and (approx-mult) inject without its
error draw, timed round-robin in one process.

    python benchmarks/inject_parts.py [--target am] [--model tinyconv] [--batch-size 128]
                                      [--rounds 15] [--weights FLOAT.safetensors]
                                      [--channels-last]

Each round runs every configuration for 2 warm-up and 3 timed training steps (forward,
cross-entropy, backward, SGD) on one Fashion-MNIST batch; the table gives each configuration's
median step and the median (first-third quartile) of its per-round ratio to float's.

* approx-mult: "float proxy" turns the fused path off (``ApproxMultTarget.fused_inject``
  returning None: the float32 proxy convolution and the separate in-place draw); "fused" is the
  exact int8 convolution with the draw in its output pass; "fused, no draw" passes it no error
  model: a lower bound, not a mode.
* sc, analog: "float proxy" turns the integer sums off (``ApproxConv2d.integer_sums`` returning
  False: the two float32 convolutions per layer); "integer sums" is inject mode as shipped.
* analog also: "old backward" makes ``approxctl.sign_pair`` find too many nonzeros in g+ + g-
  every time and never use the patches' GEMM, so its backward runs the two dense
  ``convolution_backward`` passes per input that two separate accumulations ran before it.
* sc, analog: "first layer unfused" turns ``approxctl.fused_conv`` off (the first layer's
  accumulations through the sign pair and the proxy node, as before 2026-12-07).
* sc, analog: "one conv per sign" turns ``PairCodes``'s single int8 convolution and the
  pair-bounded int8 route off (the sums as one convolution per weight sign: without VNNI
  float32 ones, as before 2026-12-07, later).
* sc, analog: "codes NCHW" gives the integer convolution its input codes in the plain order,
  which oneDNN transposes to channels-last itself (as before 2026-12-07, evening; the codes
  now come channels-last from the quantize pass).
* approx-mult: "fused, zero point 128" quantizes every input with zero point 128 (codes up to
  254: without VNNI the float32 route, as before 2026-12-07, later).

The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from round_robin import (
    add_batch_and_model_options,
    batch_and_model,
    ready_to_train,
    seconds_per_step,
)

from approxctl import (
    fused_conv,
    integer_conv,
    set_mode,
    sign_pair,
)
from approxctl import quantized_conv as quantized
from approxctl.backends import cpu_int8, cpu_sparse_grad
from approxctl.integer_conv import PairCodes
from approxctl.layers import ApproxConv2d
from approxctl.profile import paired_ratio_quartiles
from approxctl.targets.approx_mult import ApproxMultTarget

Patch = tuple[Any, str, Callable[..., Any]]  # (owner, attribute, replacement)


def variants(target: str) -> dict[str, list[Patch]]:
    """Configuration name -> the patches that make it (none: inject mode as shipped)."""
    if target == "am":
        fused = ApproxMultTarget.fused_inject

        def no_draw(self: Any, layer: Any, x: torch.Tensor, noise: Any) -> Any:
            return fused(self, layer, x, None)

        return {
            "float proxy": [(ApproxMultTarget, "fused_inject", lambda *args: None)],
            "fused, zero point 128": [(quantized, "_zero_point", lambda x: 128)],
            "fused": [],
            "fused, no draw": [(ApproxMultTarget, "fused_inject", no_draw)],
        }
    float_proxy: list[Patch] = [(ApproxConv2d, "integer_sums", lambda self, x: False)]
    unfused: list[Patch] = [(fused_conv, "usable", lambda *args: False)]
    per_sign: list[Patch] = [
        (PairCodes, "_int8_pair", lambda self, geometry: None),
        (cpu_int8, "exact_for", lambda code_max, weight_max: cpu_int8.available()),
    ]
    real_codes = integer_conv.fake_quant_codes

    def plain_order_codes(x: torch.Tensor, step: float, qmax: int) -> Any:
        out, codes = real_codes(x, step, qmax)
        return out, None if codes is None else codes.contiguous()

    nchw: list[Patch] = [(integer_conv, "fake_quant_codes", plain_order_codes)]
    configs = {
        "float proxy": float_proxy, "integer sums, first layer unfused": [*unfused, *per_sign],
        "integer sums, one conv per sign": per_sign, "integer sums, codes NCHW": nchw,
        "integer sums": [],
    }  # fmt: skip
    if target == "analog":  # the backward before approxctl.sign_pair (2026-12-06)
        before: list[Patch] = [
            (cpu_sparse_grad, "nonzero_sums", lambda *args: -1),
            (sign_pair._DenseBackward, "by_patches", lambda self, weight: False),
            *unfused,
            *per_sign,
        ]
        configs = {"float proxy": float_proxy, "integer sums, old backward": before, **configs}
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="am", choices=["am", "sc", "analog"])
    add_batch_and_model_options(parser)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--channels-last", action="store_true",
        help="model and input in channels-last memory order (every mode; the kernels take the "
        "plain order, so inject transposes)",
    )  # fmt: skip
    args = parser.parse_args()
    # trained weights: analog's saturation, hence its backward, depends on them
    x, y, model = batch_and_model(args.model, args.batch_size, args.weights)
    model = ready_to_train(model, args.target, x)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    patches = variants(args.target)
    originals = {
        (owner, name): getattr(owner, name) for p in patches.values() for owner, name, _ in p
    }
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
                for (owner, attribute), original in originals.items():
                    setattr(owner, attribute, original)
                for owner, attribute, replacement in patches.get(name, []):
                    setattr(owner, attribute, replacement)
                times[name].append(seconds_per_step(step))
    finally:
        for (owner, attribute), original in originals.items():
            setattr(owner, attribute, original)
    order = ", channels-last" if args.channels_last else ""
    print(f"{args.model}, {args.target}, batch {args.batch_size}, {args.rounds} rounds{order}")
    print("| configuration | ms per step | ratio to float (per-round quartiles) |")
    print("|---|---|---|")
    for name in configs:
        ratios = [t / f for t, f in zip(times[name], times["float"], strict=True)]
        median = statistics.median(ratios)
        q1, q3 = paired_ratio_quartiles(times[name], times["float"])  # one round: its ratio
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.1f} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")


if __name__ == "__main__":
    main()
