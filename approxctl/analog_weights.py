"""Analog's weight quantization chain (SPEC 3.3) as one autograd node on CPU.

A layer's weights are 8-bit with one scale per output channel, ``scale = max|w| / 127``, codes
``round(w / scale)`` with a straight-through gradient, and the proxy accumulates the two signs
of ``codes / a_step`` (activations arrive as codes times ``a_step``, so the sums come in
products). As torch ops that chain is about fifteen small operations and six autograd nodes per
layer, forward and backward: 0.6 ms for TinyConv's second layer (25,600 weights), a fixed cost
of every training step that does not shrink with the batch. ``split_weights`` gives the same
tensors bit for bit, and the same gradient, from one numba pass each way
(``approxctl.backends.cpu_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from approxctl.noise import use_kernels

try:
    from approxctl.backends import cpu_weights
except ImportError:  # numba missing: ``split_weights`` says no
    cpu_weights = None  # type: ignore[assignment]


@dataclass(frozen=True)
class SplitWeights:
    """``scale`` (O,) float32; ``codes`` int8 of the weight's shape, in [-127, 127], no
    gradient; ``pos`` and ``neg`` = ``clamp(+-codes / a_step, min=0)`` in float32, whose
    gradient reaches the weight straight through the rounding."""

    scale: torch.Tensor
    codes: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


class _SplitWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, a_step):  # type: ignore[no-untyped-def]
        w = w.contiguous()
        rows = w.shape[0]
        scale = torch.empty(rows)
        codes = torch.empty(w.shape, dtype=torch.int8)
        pos, neg = torch.empty(w.shape), torch.empty(w.shape)
        finite = cpu_weights.split_forward(
            _flat(w), rows, np.float32(a_step), scale.numpy(), _flat(codes), _flat(pos),
            _flat(neg),
        )  # fmt: skip
        if not finite:
            return None, None, None, None
        ctx.mark_non_differentiable(scale, codes)
        ctx.save_for_backward(codes, scale)
        ctx.a_step = a_step
        return scale, codes, pos, neg

    @staticmethod
    def backward(ctx, _scale, _codes, grad_pos, grad_neg):  # type: ignore[no-untyped-def]
        codes, scale = ctx.saved_tensors
        grad_pos, grad_neg = grad_pos.contiguous(), grad_neg.contiguous()
        out = torch.empty(codes.shape)
        cpu_weights.split_backward(
            _flat(grad_pos), _flat(grad_neg), _flat(codes), codes.shape[0],
            np.float32(ctx.a_step), scale.numpy(), _flat(out),
        )  # fmt: skip
        return out, None


def split_weights(w: torch.Tensor, a_step: float) -> SplitWeights | None:
    """The chain's tensors for weight ``w`` (O, ...) and activation step ``a_step``; None
    where this path does not serve (not a CPU float32 weight, numba missing, a NaN or infinite
    weight: the caller then runs the torch ops, which propagate them)."""
    if cpu_weights is None or not use_kernels(w) or w.dim() < 2:
        return None
    scale, codes, pos, neg = _SplitWeights.apply(w, a_step)
    if scale is None:
        return None
    return SplitWeights(scale, codes, pos, neg)
