"""The direct convolution kernels of exact mode on CPU, timed on a model's own layer inputs.

    python benchmarks/direct_convs.py [--target sc] [--model tinyconv] [--batch-size 128]
                                      [--rounds 7] [--weights FLOAT.safetensors]

Converts the model for the target, calibrates it on one Fashion-MNIST batch, runs one exact
forward without gradients and records every call of the target's direct convolution kernel
(``approxctl.backends.cpu_kernels``: ``sc_conv2d_paired`` or ``sc_conv2d`` for sc,
``analog_conv2d`` for analog) with its operands. Each recorded call is then timed round-robin
(one call of each kernel per round) and the table gives the median milliseconds per call. For
sc with one-word streams (L <= 32) the one-pixel kernel ``sc_conv2d`` runs on the same operands
as a baseline, and its output is compared with the shipped kernel's bit for bit.

The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from round_robin import add_batch_and_model_options, batch_and_model

from approxctl import calibrate, convert, set_mode
from approxctl.backends import cpu_kernels

KERNELS = {"sc": ("sc_conv2d_paired", "sc_conv2d"), "analog": ("analog_conv2d",)}


def record_calls(model: torch.nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[Any]:
    """(kernel name, operands) of every direct-convolution kernel call in one exact forward."""
    calls: list[Any] = []
    originals = {name: getattr(cpu_kernels, name) for name in names}

    def recorder(name: str) -> Callable[..., Any]:
        def call(*operands: Any) -> Any:
            calls.append((name, tuple(np.copy(o) if isinstance(o, np.ndarray) else o
                                      for o in operands)))  # fmt: skip
            return originals[name](*operands)

        return call

    try:
        for name in names:
            setattr(cpu_kernels, name, recorder(name))
        with torch.no_grad():
            model(x)
    finally:
        for name, kernel in originals.items():
            setattr(cpu_kernels, name, kernel)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="sc", choices=sorted(KERNELS))
    add_batch_and_model_options(parser)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    # trained weights: how many inputs are zero (skipped) depends on them
    x, _, model = batch_and_model(args.model, args.batch_size, args.weights)
    model = convert(model, args.target)
    calibrate(model, [x])
    model.eval()
    set_mode(model, "exact")
    calls = record_calls(model, x, KERNELS[args.target])
    threads = torch.get_num_threads()
    print(f"{args.model}, {args.target}, batch {args.batch_size}, {threads} threads")
    header = ("kernel", "input", "zeros", "ms", "baseline ms", "same bits")
    print("{:<18} {:<20} {:>6} {:>8} {:>12} {:>10}".format(*header))
    for name, operands in calls:
        kernels = [getattr(cpu_kernels, name)]
        if name == "sc_conv2d_paired":
            kernels.append(cpu_kernels.sc_conv2d)
        outs = [np.empty_like(operands[-1]) for _ in kernels]
        times: list[list[float]] = [[] for _ in kernels]
        for kernel, out in zip(kernels, outs, strict=True):
            kernel(*operands[:-1], out)  # compiled and warm before the timed rounds
        for _ in range(args.rounds):
            for kernel, out, spent in zip(kernels, outs, times, strict=True):
                start = time.perf_counter()
                kernel(*operands[:-1], out)
                spent.append(time.perf_counter() - start)
        ms = [statistics.median(t) * 1e3 for t in times]
        baseline = f"{ms[1]:12.1f}" if len(ms) > 1 else f"{'':12}"
        same = str(np.array_equal(outs[0], outs[1])) if len(outs) > 1 else ""
        zeros = float((operands[0] == 0).mean())
        shape = "x".join(str(d) for d in operands[0].shape)
        print(f"{name:<18} {shape:<20} {zeros:6.2f} {ms[0]:8.1f} {baseline} {same:>10}")


if __name__ == "__main__":
    main()
