"""Accuracy of a model on a dataset in one mode, with per-layer emulation error (SPEC 5).

``evaluate`` runs a loader through a (converted or plain) model in eval mode and reports
top-1/top-5 accuracy and mean cross-entropy. In ``exact`` mode it can also measure each
approximate layer's error on the evaluation data: the difference between the hardware's output
and the proxy's, in the layer's accumulator units, relative to the proxy output's spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from approxctl.convert import set_mode
from approxctl.error_models import RunningMoments
from approxctl.layers import ApproxLayer, approx_layers

Progress = Callable[[int, int], None]  # (batches done, batches total)


@dataclass
class LayerError:
    """exact - proxy of one layer over the evaluation data (accumulator units)."""

    error: RunningMoments = field(default_factory=RunningMoments)
    output: RunningMoments = field(default_factory=RunningMoments)

    def to_json(self) -> dict[str, float]:
        spread = self.output.std or 1.0
        return {
            "err_mean": self.error.mean,
            "err_std": self.error.std,
            "out_std": self.output.std,
            "rel_err_mean": self.error.mean / spread,
            "rel_err_std": self.error.std / spread,
        }


@dataclass
class EvalResult:
    mode: str
    top1: float
    top5: float
    loss: float
    samples: int
    seconds: float
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "samples": self.samples,
            "seconds": self.seconds,
            "layers": self.layers,
        }


def _error_hook(stats: LayerError) -> Callable[..., None]:
    """Forward hook: compare the layer's exact output with its proxy on the same input."""

    @torch.no_grad()
    def hook(layer: ApproxLayer, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        q = layer.target.quantize(layer, args[0])
        proxy = layer.target.proxy(layer, q)
        scale = layer.per_channel(layer.target.output_scale(layer, q))
        bias = 0.0 if layer.bias is None else layer.per_channel(layer.bias)
        v = (proxy - bias) / scale
        stats.error.add((output - bias) / scale - v)
        stats.output.add(v)

    return hook


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mode: str = "exact",
    device: torch.device | str = "cpu",
    layer_errors: bool = True,
    progress: Progress | None = None,
    total: int | None = None,
) -> EvalResult:
    """Top-1/top-5 accuracy and loss of ``model`` over ``batches`` of (images, labels).

    ``mode`` applies to converted models (``float`` leaves a plain model untouched). With
    ``layer_errors`` (exact mode), each approximate layer's error is measured on the way.
    """
    started = time.perf_counter()
    layers = approx_layers(model)
    if layers:
        previous = {name: layer.mode for name, layer in layers}
        set_mode(model, mode)
    was_training = model.training
    model.eval()
    hooks, stats = [], {}
    if layer_errors and mode == "exact":
        for name, layer in layers:
            stats[name] = LayerError()
            hooks.append(layer.register_forward_hook(_error_hook(stats[name])))
    correct1 = correct5 = samples = 0
    loss_sum = 0.0
    try:
        for done, (x, y) in enumerate(batches, 1):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(dim=1).sum())
            samples += int(y.numel())
            if progress:
                progress(done, total or 0)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        for name, layer in layers:
            layer.mode = previous[name]
    n = max(samples, 1)
    return EvalResult(
        mode=mode,
        top1=correct1 / n,
        top5=correct5 / n,
        loss=loss_sum / n,
        samples=samples,
        seconds=time.perf_counter() - started,
        layers={name: s.to_json() for name, s in stats.items()},
    )
