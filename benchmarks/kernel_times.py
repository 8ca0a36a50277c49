"""The numba kernels of one inject step, each timed alone on that step's own arguments.

    python benchmarks/kernel_times.py [--target analog] [--model tinyconv] [--batch-size 128]
                                      [--calls 40] [--weights FLOAT.safetensors]

One training step of the converted model in inject mode records every call of the CPU kernels
below with a copy of its arguments; each call is then repeated ``--calls`` times and the table
gives its minimum (the least disturbed run on a shared machine; medians move with the machine).
To compare two versions of the code, run this on each, alternated a few times. Results of record
are in docs/design.md ("Offsets, not slices, in short loops").
"""

from __future__ import annotations

import argparse
import time
from types import ModuleType
from typing import Any

import numpy as np
import torch.nn.functional as F
from round_robin import add_batch_and_model_options, batch_and_model, ready_to_train

from approxctl import set_mode
from approxctl.backends import cpu_codes, cpu_fused_conv, cpu_pointwise, cpu_sparse_grad

KERNELS: dict[ModuleType, tuple[str, ...]] = {
    cpu_fused_conv: ("forward", "backward"),
    cpu_pointwise: (
        "hardtanh_proxy_forward", "hardtanh_proxy_backward", "sc_proxy_forward",
        "sc_proxy_backward", "add_noise", "fake_quant_forward", "masked_grad",
    ),
    cpu_codes: ("quantize_planes", "quantize_codes", "pair_outputs", "affine_output"),
    cpu_sparse_grad: ("nonzero_sums", "conv_sparse_backward"),
}  # fmt: skip

Call = tuple[str, Any, list[Any]]


def record_calls() -> list[Call]:
    """Wrap every kernel of KERNELS so each call appends (name, kernel, copied arguments)."""
    calls: list[Call] = []

    def wrap(module: ModuleType, name: str) -> None:
        kernel = getattr(module, name)

        def recording(*args: Any) -> Any:
            copied = [np.copy(a) if isinstance(a, np.ndarray) else a for a in args]
            calls.append((f"{module.__name__.rsplit('.', 1)[-1]}.{name}", kernel, copied))
            return kernel(*args)

        setattr(module, name, recording)

    for module, names in KERNELS.items():
        for name in names:
            wrap(module, name)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="analog", choices=["am", "sc", "analog"])
    add_batch_and_model_options(parser)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    x, y, model = batch_and_model(args.model, args.batch_size, args.weights)
    model = ready_to_train(model, args.target, x)
    set_mode(model, "inject")
    calls = record_calls()
    F.cross_entropy(model(x), y).backward()
    print(f"{args.model}, {args.target}, batch {args.batch_size}: minimum of {args.calls} calls")
    print("| kernel (call order) | ms |")
    print("|---|---|")
    for name, kernel, kernel_args in calls:
        kernel(*kernel_args)  # compiled and cached already; this warms the caches
        best = float("inf")
        for _ in range(args.calls):
            start = time.perf_counter()
            kernel(*kernel_args)
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {best * 1000:.3f} |")


if __name__ == "__main__":
    main()
