"""Cost of drawing the injected error on CPU, per output element (inject mode, SPEC section 4).

    python benchmarks/bench_noise.py [--elements 4194304] [--repeats 40]

Times ``cpu_pointwise.add_noise`` (the error draw of approx-mult, and the tail of the fused proxy
kernels) against a plain read-and-write pass over the same tensor, for polynomial degrees 0 (the
type-2 Gaussian model), 4 and 10 (the type-1 default), and for per-(sample, channel) segments
from conv-sized (1024, 256, 64 and 16 elements) down to a linear layer's (1 element). Minimum
over the repeats; compare the rows of one run only. The results of record are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from approxctl.backends import cpu_pointwise
from approxctl.noise import NoiseSpec


def fastest(call: Callable[[], object], repeats: int) -> float:
    call()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.elements
    y = torch.randn(n).numpy()
    out = np.empty_like(y)
    copy = fastest(lambda: np.add(y, np.float32(1.0), out=out), args.repeats)
    print(f"read + write pass: {copy / n * 1e9:.3f} ns/element")
    print("| degree | segment | ns/element |\n|---|---|---|")
    for degree, inner, channels in [(0, 1024, 32), (4, 1024, 32), (10, 1024, 32), (10, 256, 32),
                                    (10, 64, 64), (10, 16, 64), (10, 1, 10)]:  # fmt: skip
        spec = NoiseSpec(
            torch.randn(degree + 1) * 0.01, torch.rand(degree + 1) * 0.01 + 0.05, -3.0, 3.0
        )
        noise = spec.kernel_args()
        scale = np.ones(channels, np.float32)
        bias = np.zeros(channels, np.float32)
        usable = n - n % (inner * channels)

        def draw() -> None:
            cpu_pointwise.add_noise(y[:usable], *noise, scale, bias, inner, out[:usable])  # noqa: B023

        seconds = fastest(draw, args.repeats)
        print(f"| {degree} | {inner} | {seconds / usable * 1e9:.3f} |")


if __name__ == "__main__":
    main()
