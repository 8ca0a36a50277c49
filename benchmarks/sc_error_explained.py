"""How much of SC's emulation error could an error model that sees only the accumulations explain?

    python benchmarks/sc_error_explained.py --model resnet_tiny \
        --weights runs/results/resnet_tiny-float/pretrained.safetensors [--batches 2]

For every SC layer, calibrated on 8 batches of Fashion-MNIST and then run in exact mode on
``--batches`` training batches, the error ``exact - SC_act`` is grouped by equal-count bins of
(a) the proxy value v, 30 bins (what the type-1 model of SPEC section 4 bins by), (b) v, 900
bins (the finest function of v these samples support), and (c) the pair of accumulations
(z+, z-), 30 x 30 bins. Each column is the share of the error's variance that the per-bin means
explain (R^2). What no column explains depends on the input pattern itself (which stream bits
coincide in the OR), which injected noise cannot mimic.
The results of record are in docs/results.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from approxctl import set_mode
from approxctl.layers import ApproxLayer
from approxctl.pipeline import DataOptions, prepare_model


def explained_variance(keys: Sequence[np.ndarray], err: np.ndarray, bins: int) -> float:
    """R^2 of the per-bin means of ``err``, bins of equal count along each key (a grid)."""
    index = np.zeros(err.shape[0], dtype=np.int64)
    for key in keys:
        edges = np.unique(np.quantile(key, np.linspace(0, 1, bins + 1)[1:-1]))
        index = index * (bins + 1) + np.searchsorted(edges, key)
    _, groups = np.unique(index, return_inverse=True)
    means = np.bincount(groups, err) / np.bincount(groups)
    return float(1 - (err - means[groups]).var() / err.var())


def accumulations(layer: ApproxLayer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(z+, z-, v = SC_act, exact) of an SC layer on input x, as ScTarget computes them."""
    target = layer.target
    q = target.quantize(layer, x)
    unit = 1.0 / (target.config.length**2 * float(q["a_step"]))
    w_pos, w_neg = q["w_pos"] * unit, q["w_neg"] * unit
    pos, neg = [(q["a"], w_pos)], [(q["a"], w_neg)]
    if "a_neg" in q:
        pos.append((q["a_neg"], w_neg))
        neg.append((q["a_neg"], w_pos))
    z_pos, z_neg = layer.accumulate_terms(pos), layer.accumulate_terms(neg)
    v = torch.exp(-z_neg) - torch.exp(-z_pos)
    return z_pos, z_neg, v, target.exact(layer, q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyconv")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = DataOptions(limit_train=1024, limit_val=128).load()  # 8 calibration batches
    model, _, _ = prepare_model(
        args.model, "sc", bundle, torch.device("cpu"), weights=args.weights
    )
    model.eval()
    set_mode(model, "exact")
    seen: dict[str, list[list[torch.Tensor]]] = {}

    def record(layer: ApproxLayer, inputs: tuple[torch.Tensor, ...]) -> None:
        parts = seen.setdefault(layer.layer_name, [[], [], [], []])
        for store, value in zip(parts, accumulations(layer, inputs[0]), strict=True):
            store.append(value.flatten().double())

    for module in model.modules():
        if isinstance(module, ApproxLayer):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        for (x, _), _ in zip(bundle.train, range(args.batches), strict=False):
            model(x)
    print(f"{args.model}, {args.batches} batches of 128, exact mode\n")
    print("| layer | error std / exact std | R^2: v, 30 bins | v, 900 bins | (z+, z-), 30 x 30 |")
    print("|---|---|---|---|---|")
    for name, parts in seen.items():
        z_pos, z_neg, v, exact = (torch.cat(p).numpy() for p in parts)
        err = exact - v
        if err.var() == 0:
            continue
        print(
            f"| {name} | {err.std() / exact.std():.2f} | {explained_variance([v], err, 30):.3f} "
            f"| {explained_variance([v], err, 900):.3f} "
            f"| {explained_variance([z_pos, z_neg], err, 30):.3f} |"
        )


if __name__ == "__main__":
    main()
