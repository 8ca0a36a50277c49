"""The positive- and negative-weight accumulations of one input, ``z+ = acc(x, w+)`` and
``z- = acc(x, w-)``, as one autograd node whose backward runs one dense convolution (or GEMM)
gradient where the two output gradients are each other's negation.

Analog's proxy (SPEC 3.3) is ``clamp(z+, 0, T) - clamp(z-, 0, T)``: the gradient reaches z+ as
g and z- as -g wherever neither clamp holds, which after float pretraining is nearly
everywhere but in a first layer (Fashion-MNIST TinyConv and ResNet-tiny: at most 0.5% of a
later layer's outputs saturate, 6-17% of a first layer's; docs/design.md, "Proxies"). With
``d = g+ + g-``, zero where neither saturates, the gradients autograd would compute from two
separate accumulations are

    dx  = convT(g+, w+) + convT(g-, w-) = convT(g+, w+ - w-) + convT(d, w-)
    dw+ = wgrad(x, g+)
    dw- = wgrad(x, g-) = -wgrad(x, g+) + wgrad(x, d)

so one dense backward on ``w+ - w-`` plus a correction over the few nonzeros of d gives them (up
to float rounding) for about half the cost. Where d has more nonzeros than ``SPARSE_FRACTION`` of
the outputs (a first layer; sc, whose gradients g e^-z+ and -g e^-z- are never negations),
the backward is the two dense ones, as autograd would run them.

CPU float32 only (``usable``); the caller keeps two plain accumulations elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from approxctl import patch_grad
from approxctl.integer_conv import MIN_REDUCTION, ConvGeometry
from approxctl.noise import use_kernels

try:
    from approxctl.backends import cpu_sparse_grad
except ImportError:  # numba missing: ``usable`` says no
    cpu_sparse_grad = None  # type: ignore[assignment]

# The correction costs a scalar multiply-add per (nonzero, input of its window) where the dense
# pass costs a vectorized one per (output, input of its window). Measured on TinyConv's second
# layer (batch 128, 1 M outputs, input and weight gradients; the AVX2 CPU of 2026-12-06): dense
# 46.6 ms; the correction 1.0 ms for 100 nonzeros, 14.7 ms for 4096 (= 1/256 of the outputs),
# 50.2 ms for 16384. 1/256 keeps the correction well below a dense pass; the scan that counts
# the nonzeros took 1.1 ms over 1 M outputs where all were zero.
SPARSE_FRACTION = 1 / 256

Sums = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Negation:
    """What the consumer of a pair's sums found out about the gradients it sent back:
    ``certain`` where g+ + g- is zero at every output (set by analog's HardTanh pair, which
    counts that in its own backward pass, as the scan would), so the pair's backward need not
    scan them."""

    certain: bool = False


def usable(*tensors: torch.Tensor) -> bool:
    return cpu_sparse_grad is not None and use_kernels(*tensors)


class _DenseBackward:
    """The input and weight gradients of ``acc(x, weight)`` for dense output gradients:
    ``convolution_backward`` (``linear``'s GEMMs for no geometry), except for the weight
    gradient alone of a convolution with few products per output (a first layer: the input
    wants no gradient, K < ``MIN_REDUCTION``). That one is a batched GEMM of the output
    gradient with the input's patches (``approxctl.patch_grad``), built once for every
    gradient of the pair: on the 2-core AMD EPYC (AVX2, no VNNI) CPU, TinyConv's first layer
    (1 channel, 5x5, batch 128) measured 11.8 ms for two weight gradients this way against
    oneDNN's 27.7 ms (docs/benchmarks.md)."""

    def __init__(self, x: torch.Tensor, geometry: ConvGeometry | None, need_x: bool) -> None:
        self.x, self.geometry, self.need_x = x, geometry, need_x
        self._patches: torch.Tensor | None = None

    def by_patches(self, weight: torch.Tensor) -> bool:
        return (
            self.geometry is not None and not self.need_x and self.geometry.groups == 1
            and weight[0].numel() < MIN_REDUCTION
        )  # fmt: skip

    def __call__(
        self, grad: torch.Tensor, weight: torch.Tensor, need_w: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, geometry, need_x = self.x, self.geometry, self.need_x
        if geometry is None:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_x = (grad @ weight) if need_x else None
            grad_w = (rows.t() @ x.reshape(-1, x.shape[-1])) if need_w else None
            return grad_x, grad_w
        if not need_w and not need_x:
            return None, None
        stride, padding, dilation, groups = geometry.args
        if need_w and self.by_patches(weight):
            if self._patches is None:
                self._patches = patch_grad.input_patches(x, tuple(weight.shape[2:]), geometry)
            return None, patch_grad.weight_grad(grad, self._patches, weight.shape)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.contiguous(), x, weight, None, stride, padding, dilation, False, [0, 0],
            groups, [need_x, need_w, False],
        )  # fmt: skip
        return grad_x, grad_w


def _sparse_backward(
    values: torch.Tensor,
    index: torch.Tensor,
    out_shape: torch.Size,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: ConvGeometry | None,
    grad_x: torch.Tensor | None,
    grad_w: torch.Tensor | None,
) -> None:
    """Add the gradients of ``acc(x, weight)`` from an output gradient of ``out_shape`` that
    is ``values`` at the flat positions ``index`` and zero elsewhere, to ``grad_x`` and
    ``grad_w`` in place."""
    if geometry is None:
        k = x.shape[-1]
        rows, outputs = index // weight.shape[0], index % weight.shape[0]
        if grad_x is not None:
            grad_x.view(-1, k).index_add_(0, rows, values[:, None] * weight[outputs])
        if grad_w is not None:
            grad_w.index_add_(0, outputs, values[:, None] * x.reshape(-1, k)[rows])
        return
    none = cpu_sparse_grad.empty_like_none()
    stride, padding, dilation, groups = geometry.args
    cpu_sparse_grad.conv_sparse_backward(
        values.numpy(), index.numpy(), np.array(out_shape, dtype=np.int64),
        x.detach().contiguous().numpy(), weight.detach().contiguous().numpy(),
        np.array(stride, dtype=np.int64), np.array(padding, dtype=np.int64),
        np.array(dilation, dtype=np.int64), groups,
        none if grad_x is None else grad_x.numpy(), none if grad_w is None else grad_w.numpy(),
    )  # fmt: skip


class _SignPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_pos, w_neg, sums, geometry, negation):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, w_pos, w_neg)
        ctx.geometry = geometry
        ctx.negation = negation
        return sums()

    @staticmethod
    def backward(ctx, grad_pos, grad_neg):  # type: ignore[no-untyped-def]
        x, w_pos, w_neg = ctx.saved_tensors
        need_x, need_pos, need_neg = ctx.needs_input_grad[:3]
        need_w = need_pos or need_neg
        geometry = ctx.geometry
        # Under autocast the forward's float convolutions ran in a lower precision; the
        # gradients are computed in the operands' own dtype, as for the integer sums.
        grad_pos = grad_pos.to(x.dtype).contiguous()
        grad_neg = grad_neg.to(x.dtype).contiguous()
        if ctx.negation is not None and ctx.negation.certain:
            count, index = 0, None
        else:
            limit = int(grad_pos.numel() * SPARSE_FRACTION)
            index = np.empty(limit, dtype=np.int64)
            count = cpu_sparse_grad.nonzero_sums(
                grad_pos.view(-1).numpy(), grad_neg.view(-1).numpy(), limit, index
            )
        dense = _DenseBackward(x, geometry, need_x)
        if count < 0:  # d is dense: the two backward passes autograd would run
            x_pos, g_pos = dense(grad_pos, w_pos, need_pos)
            x_neg, g_neg = dense(grad_neg, w_neg, need_neg)
            grad_x = x_pos + x_neg if need_x else None  # type: ignore[operator]
            return grad_x, g_pos, g_neg, None, None, None
        grad_x, grad_w = dense(grad_pos, w_pos - w_neg, need_w)
        grad_neg_w = None if grad_w is None else grad_w.neg()
        if count:
            at = torch.from_numpy(index[:count])  # type: ignore[index]
            d = grad_pos.view(-1)[at] + grad_neg.view(-1)[at]  # the nonzeros of g+ + g-
            if grad_x is not None:
                grad_x = grad_x.contiguous()
            if grad_neg_w is not None:
                grad_neg_w = grad_neg_w.contiguous()
            _sparse_backward(d, at, grad_pos.shape, x, w_neg, geometry, grad_x, grad_neg_w)
        return (
            grad_x,
            grad_w if need_pos else None,
            grad_neg_w if need_neg else None,
            None,
            None,
            None,
        )


def sign_pair(
    x: torch.Tensor,
    w_pos: torch.Tensor,
    w_neg: torch.Tensor,
    geometry: ConvGeometry | None,
    sums: Sums | None = None,
    negation: Negation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acc(x, w_pos), acc(x, w_neg))`` with acc ``conv2d`` of ``geometry`` (zero padding,
    no bias), or ``linear`` where ``geometry`` is None. ``sums`` computes the two forward values
    when they come another way (exact integer sums, ``approxctl.integer_conv``); the backward is
    the float accumulations' either way. ``negation``: what the sums' consumer will have found
    about the gradients it sends back. CPU float32 tensors (``usable``)."""
    if sums is None:
        if geometry is None:
            sums = lambda: (F.linear(x, w_pos), F.linear(x, w_neg))  # noqa: E731
        else:
            args = geometry.args
            sums = lambda: (F.conv2d(x, w_pos, None, *args), F.conv2d(x, w_neg, None, *args))  # noqa: E731
    return _SignPair.apply(x, w_pos, w_neg, sums, geometry, negation)
