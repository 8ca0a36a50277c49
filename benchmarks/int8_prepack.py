"""What packing the int8 pair's weights costs per call, with one weight scale per output channel
(before 2026-12-07 evening) and one for the tensor (``approxctl.backends.cpu_int8.conv2d``).

    python benchmarks/int8_prepack.py [--calls 200]

oneDNN's ``qconv_prepack`` runs once per layer call in inject mode, since the weights change
every training step. The shapes are TinyConv's int8 pairs at batch 128 (second and third layer:
2 x 32 and 2 x 64 output channels) and a wider one. Each row checks that the convolution gives
the same sums either way. Minimum over 7 repeats of ``--calls`` calls; compare the rows of one
run only. The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

SHAPES = [(64, 32, 16), (128, 32, 8), (256, 64, 8)]  # (pair outputs, input channels, size)


def fastest_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(5):
        call()
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    geometry = ([1, 1], [2, 2], [1, 1], 1)
    print("| pair outputs | input channels | size | per-channel scales us | one scale us "
          "| same sums |\n|---|---|---|---|---|---|")  # fmt: skip
    for outputs, channels, size in SHAPES:
        weight = torch.randint(-64, 64, (outputs, channels, 5, 5), dtype=torch.int8)
        codes = torch.randint(0, 256, (128, channels, size, size), dtype=torch.uint8)
        times, sums = [], []
        for count in (outputs, 1):
            scales, zeros = torch.ones(count), torch.zeros(count, dtype=torch.int64)
            pack = functools.partial(
                torch.ops.onednn.qconv_prepack, weight, scales, 1.0, 0, *geometry, list(codes.shape)
            )
            times.append(fastest_us(pack, args.calls))
            sums.append(torch.ops.onednn.qconv2d_pointwise(
                codes, 1.0, 0, pack(), scales, zeros, None, *geometry, 1.0, 0, torch.float32,
                "none", [], "",
            ))  # fmt: skip
        same = torch.equal(*sums)
        print(f"| {outputs} | {channels} | {size} | {times[0]:.0f} | {times[1]:.0f} | {same} |")


if __name__ == "__main__":
    main()
