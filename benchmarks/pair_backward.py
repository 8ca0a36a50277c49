"""The backward of a sign pair with dense gradients on both sides (sc always; analog where its
clamps bind): two convolution backward passes, one per weight sign, as ``approxctl.sign_pair``
runs them, against one pass over both weights' output channels side by side (the
concatenations included), an alternative measured no faster on this project's CPU
(docs/benchmarks.md) and so not used.

    python benchmarks/pair_backward.py [--batch-size 128] [--repeats 7]

Shapes: TinyConv's second and third layers, ResNet-tiny's 3x3 layers at 16, 32 and 64
channels (1x32x32 inputs). Times alternate between the two ways, ``--repeats`` turns of 3
calls; the table gives the medians and the largest difference between the input gradients,
relative to the largest (float rounding: the same sums in another order). The results of record
are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import torch
from round_robin import alternated_medians

# (name, input channels, output channels, size, kernel, padding)
LAYERS = [
    ("tinyconv second", 32, 32, 16, 5, 2),
    ("tinyconv third", 32, 64, 8, 5, 2),
    ("resnet_tiny 16", 16, 16, 32, 3, 1),
    ("resnet_tiny 32", 32, 32, 16, 3, 1),
    ("resnet_tiny 64", 64, 64, 8, 3, 1),
]
CALLS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| layer | two passes ms | one pass ms | one / two | max difference |\n"
          "|---|---|---|---|---|")  # fmt: skip
    for name, channels, outputs, size, kernel, padding in LAYERS:
        x = torch.randn(args.batch_size, channels, size, size)
        w_pos, w_neg = (torch.randn(outputs, channels, kernel, kernel) for _ in range(2))
        g_pos, g_neg = (torch.randn(args.batch_size, outputs, size, size) for _ in range(2))
        geometry = ([1, 1], [padding] * 2, [1, 1], False, [0, 0], 1, [True, True, False])

        def backward(grad: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry)  # noqa: B023

        def two() -> torch.Tensor:
            return backward(g_pos, w_pos)[0] + backward(g_neg, w_neg)[0]  # noqa: B023

        def one() -> torch.Tensor:
            return backward(torch.cat([g_pos, g_neg], 1), torch.cat([w_pos, w_neg]))[0]  # noqa: B023

        a, b = two(), one()
        difference = float((a - b).abs().max() / a.abs().max())
        medians = alternated_medians({"two": two, "one": one}, args.repeats, CALLS)
        t2, t1 = medians["two"], medians["one"]
        print(f"| {name} | {t2:.1f} | {t1:.1f} | {t1 / t2:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
