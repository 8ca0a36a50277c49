"""What each approximate layer adds to a training step: every layer alone, forward and backward,
float against another mode, on the input and the output gradient it gets in a real step.

    python benchmarks/layer_costs.py [--target analog] [--mode inject] [--model tinyconv]
                                     [--batch-size 128] [--rounds 12] [--weights FLOAT.safetensors]

One training step of the converted model in ``--mode`` records each approximate layer's input
and output gradient (the gradient matters: after max pooling most of it is zero, which decides
how sparse analog's sign-pair correction is). Each layer then runs forward and backward on them
alone, float and ``--mode`` alternated, 3 calls per turn, ``--rounds`` turns; the table gives the
medians and the difference. The first layer's input wants no gradient, as in the model. Results
of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from round_robin import add_batch_and_model_options, batch_and_model, ready_to_train

from approxctl import set_mode
from approxctl.layers import approx_layers

CALLS_PER_TURN = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="analog", choices=["am", "sc", "analog"])
    parser.add_argument("--mode", default="inject", choices=["inject", "exact"])
    add_batch_and_model_options(parser)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    x, y, model = batch_and_model(args.model, args.batch_size, args.weights)
    model = ready_to_train(model, args.target, x)
    layers = approx_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module, call_args, out):  # type: ignore[no-untyped-def]
            inputs[name] = call_args[0].detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers]
    set_mode(model, args.mode)
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()

    print(f"{args.model}, {args.target}, batch {args.batch_size}: each layer alone, forward and "
          f"backward, median of {args.rounds} turns of {CALLS_PER_TURN} calls")  # fmt: skip
    print(f"| layer | float ms | {args.mode} ms | {args.mode} - float ms |")
    print("|---|---|---|---|")
    for index, (name, layer) in enumerate(layers):
        inp = inputs[name].requires_grad_(index > 0)
        grad = grads[name]
        times: dict[str, list[float]] = {"float": [], args.mode: []}
        for _ in range(args.rounds):
            for mode, series in times.items():
                set_mode(layer, mode)
                layer(inp).backward(grad)  # untimed: the mode's caches and thread pools
                start = time.perf_counter()
                for _ in range(CALLS_PER_TURN):
                    layer(inp).backward(grad)
                series.append((time.perf_counter() - start) / CALLS_PER_TURN * 1000)
        base, other = (statistics.median(times[m]) for m in ("float", args.mode))
        print(f"| {name} | {base:.2f} | {other:.2f} | {other - base:+.2f} |")


if __name__ == "__main__":
    main()
