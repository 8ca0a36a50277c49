"""Time each functional op against a float GEMM of the same shape, in the same run.

    python benchmarks/bench_ops.py [--rows N] [--k K] [--out O] [--backend NAME] [--device D]

The default shape is TinyConv's second layer at batch 8 as a GEMM (8*16*16 rows, K = 32*5*5,
32 outputs). Ratios, not absolute times, are what to compare across machines; the results of
record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from approxctl import functional
from approxctl.luts import load_lut


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first calls allocate and (for compiled backends) compile
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8 * 16 * 16)
    parser.add_argument("--k", type=int, default=32 * 5 * 5)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n, k, o = args.rows, args.k, args.out
    gen = torch.Generator().manual_seed(0)

    x = torch.randn(n, k, generator=gen).to(device)
    w = torch.randn(o, k, generator=gen).to(device)
    float_s = median_seconds(lambda: x @ w.T, args.repeats, device)

    a7 = torch.randint(-127, 128, (n, k), generator=gen).to(device)
    b7 = torch.randint(-127, 128, (o, k), generator=gen).to(device)
    lut = load_lut("mul7u_09Y").to(device)
    a_sc = torch.randint(0, 33, (n, k), generator=gen).to(device)
    bp = torch.randint(0, 5, (o, k), generator=gen).to(device)
    bn = torch.randint(0, 5, (o, k), generator=gen).to(device)
    a_an = torch.randint(0, 256, (n, k), generator=gen).to(device)

    ops: dict[str, Callable[[], object]] = {
        "lut_matmul (mul7u_09Y)": lambda: functional.lut_matmul(a7, b7, lut, backend=args.backend),
        "sc_matmul (L=32)": lambda: functional.sc_matmul(a_sc, bp, bn, 32, backend=args.backend),
        "analog_matmul (25, 4 bit)": lambda: functional.analog_matmul(
            a_an, b7, 25, 4, 20000, backend=args.backend
        ),
    }
    print(f"GEMM ({n} x {k}) x ({o} x {k}) on {device}, backend {args.backend}")
    print(f"{'op':28s} {'seconds':>10s} {'x float GEMM':>13s}")
    print(f"{'float32 GEMM':28s} {float_s:10.5f} {1.0:13.1f}")
    for name, fn in ops.items():
        seconds = median_seconds(fn, args.repeats, device)
        print(f"{name:28s} {seconds:10.5f} {seconds / float_s:13.1f}")


if __name__ == "__main__":
    main()
