"""A float training step in the plain (N, C, H, W) memory order against channels-last, for the
built-in model and for its converted copy in float mode, timed round-robin in one process.

    python benchmarks/memory_format.py [--model tinyconv] [--target analog] [--batch-size 128]
                                       [--rounds 9] [--weights FLOAT.safetensors]

Each round runs every configuration for 2 warm-up and 3 timed training steps (forward,
cross-entropy, backward, SGD) on one Fashion-MNIST batch; the table gives each configuration's
median step and the median of its per-round ratio to the plain model in the plain order. Every
profile in docs/benchmarks.md runs the plain order, as ``approxctl train`` does; this says how
much faster the float step itself could be. The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from round_robin import add_batch_and_model_options, batch_and_model, seconds_per_step

from approxctl import calibrate, convert, set_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="analog", choices=["am", "sc", "analog"])
    add_batch_and_model_options(parser)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    x, y, plain = batch_and_model(args.model, args.batch_size, args.weights)
    plain.train()
    converted = convert(copy.deepcopy(plain), args.target)
    calibrate(converted, [x])
    set_mode(converted, "float")
    converted.train()
    last = torch.channels_last
    x_last = x.contiguous(memory_format=last)
    configs = {
        "plain model, NCHW": (plain, x),
        "plain model, channels-last": (copy.deepcopy(plain).to(memory_format=last), x_last),
        "converted, float mode, NCHW": (converted, x),
        "converted, float mode, channels-last": (
            copy.deepcopy(converted).to(memory_format=last),
            x_last,
        ),
    }
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        for name, (model, _) in configs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (model, inputs) in configs.items():
            optimizer = optimizers[name]

            def step(model: torch.nn.Module = model, inputs: torch.Tensor = inputs,
                     optimizer: torch.optim.Optimizer = optimizer) -> None:  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(inputs), y).backward()
                optimizer.step()

            times[name].append(seconds_per_step(step))
    base = times["plain model, NCHW"]
    print(f"{args.model} ({args.target} converted), batch {args.batch_size}, {args.rounds} rounds")
    print("| configuration | ms per step | ratio to the plain model, NCHW |")
    print("|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(t / b for t, b in zip(values, base, strict=True))
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
