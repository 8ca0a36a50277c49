"""A first layer's weight gradient: oneDNN's (``convolution_backward``, what float mode and
torch run) against ``approxctl.patch_grad``'s batched GEMM with the input's patches.

    python benchmarks/patch_grad.py [--batch-size 128] [--repeats 5]

The shapes are the first layers of TinyConv (1 -> 32 channels, 5x5) and ResNet-tiny (1 -> 16,
3x3) on 1x32x32 inputs. Times alternate between the two ways, ``--repeats`` turns of 5 calls;
the table gives the medians and each gradient's largest difference from float64's, relative to
the largest gradient (float rounding: the same sum in another order). The results of record are
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import torch
from round_robin import alternated_medians

from approxctl import patch_grad
from approxctl.integer_conv import ConvGeometry

LAYERS = {"tinyconv": (32, 5, 2), "resnet_tiny": (16, 3, 1)}  # outputs, kernel, padding
CALLS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| first layer of | oneDNN ms | patches ms | patches / oneDNN | oneDNN error "
          "| patches error |\n|---|---|---|---|---|---|")  # fmt: skip
    for model, (outputs, kernel, padding) in LAYERS.items():
        x = torch.randn(args.batch_size, 1, 32, 32)
        weight = torch.randn(outputs, 1, kernel, kernel)
        grad = torch.randn(args.batch_size, outputs, 32, 32)
        geometry = ConvGeometry((1, 1), (padding, padding), (1, 1), 1)

        def onednn(grad: torch.Tensor = grad, x: torch.Tensor = x) -> torch.Tensor:
            """The weight gradient by oneDNN (in float64 for float64 operands)."""
            return torch.ops.aten.convolution_backward(
                grad, x, weight.to(x.dtype), None, [1, 1], [padding] * 2, [1, 1], False,  # noqa: B023
                [0, 0], 1, [False, True, False],
            )[1]  # fmt: skip

        def patches() -> torch.Tensor:
            cols = patch_grad.input_patches(x, (kernel, kernel), geometry)  # noqa: B023
            return patch_grad.weight_grad(grad, cols, weight.shape)  # noqa: B023

        exact = onednn(grad.double(), x.double())
        errors = [float((g.double() - exact).abs().max() / exact.abs().max())
                  for g in (onednn(), patches())]  # fmt: skip
        medians = alternated_medians({"onednn": onednn, "patches": patches}, args.repeats, CALLS)
        a, b = medians["onednn"], medians["patches"]
        print(f"| {model} | {a:.1f} | {b:.1f} | {b / a:.2f} | {errors[0]:.1e} | {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
