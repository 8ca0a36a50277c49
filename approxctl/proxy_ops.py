"""Fused forward/backward pieces of an approximate layer (paper section 3.1, Table 3).

The proxies take the positive- and negative-weight accumulations and return float outputs
``act * scale + bias`` directly: one autograd node per layer, with the least saved state, instead
of two activations, a subtraction and an affine map, each with its own saved tensors.
(The two accumulations are separate convolutions: oneDNN runs two convs with O outputs
markedly faster than one with 2O for this project's layer shapes, measured on the CI CPU.)
"""

from __future__ import annotations

import torch


def _affine_(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out.mul_(scale)
    return out if bias is None else out.add_(bias)


class _ScActivation(torch.autograd.Function):
    """(SC_act * scale + bias) with SC_act = (1 - e^-z_pos) - (1 - e^-z_neg)."""

    @staticmethod
    def forward(ctx, z_pos, z_neg, scale, bias):  # type: ignore[no-untyped-def]
        e_pos, e_neg = torch.exp(-z_pos), torch.exp(-z_neg)
        ctx.save_for_backward(e_pos, e_neg, scale)
        ctx.bias_shape = None if bias is None else bias.shape
        return _affine_(e_neg - e_pos, scale, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        e_pos, e_neg, scale = ctx.saved_tensors
        bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
        grad = grad * scale  # d/dz_pos = exp(-z_pos), d/dz_neg = -exp(-z_neg)
        return grad * e_pos, -grad * e_neg, None, bias_grad


class _HardTanhPair(torch.autograd.Function):
    """(Analog_act * scale + bias) with Analog_act = clamp(z_pos, 0, T) - clamp(z_neg, 0, T)."""

    @staticmethod
    def forward(ctx, z_pos, z_neg, t, scale, bias):  # type: ignore[no-untyped-def]
        inside_pos = (z_pos >= 0) & (z_pos <= t)
        inside_neg = (z_neg >= 0) & (z_neg <= t)
        ctx.save_for_backward(inside_pos, inside_neg, scale)
        ctx.bias_shape = None if bias is None else bias.shape
        return _affine_(z_pos.clamp(0, t) - z_neg.clamp(0, t), scale, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        inside_pos, inside_neg, scale = ctx.saved_tensors
        bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
        grad = grad * scale
        return inside_pos * grad, -(inside_neg * grad), None, None, bias_grad


class _ForwardValue(torch.autograd.Function):
    """Forward: ``exact * scale + bias``; backward: the gradient goes to ``proxy`` unchanged.

    The straight-through estimator ``proxy + (value - proxy).detach()`` of SPEC section 4, in
    one node and without its rounding (the forward value is the hardware's bit for bit). The
    value is computed here, as a new tensor, so later in-place ops (ReLU(inplace=True)) can
    modify it.
    """

    @staticmethod
    def forward(ctx, proxy, exact, scale, bias):  # type: ignore[no-untyped-def]
        return exact * scale + bias

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad, None, None, None


def sc_activation(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``scale`` and ``bias`` broadcast per output channel; ``scale`` carries no gradient."""
    return _ScActivation.apply(z_pos, z_neg, scale, bias)


def hardtanh_pair(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    t: float,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _HardTanhPair.apply(z_pos, z_neg, t, scale, bias)


def straight_through(
    proxy: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Forward ``exact * scale + bias``, backward straight into ``proxy``."""
    return _ForwardValue.apply(proxy, exact.detach(), scale.detach(), bias.detach())


def fake_quant(x: torch.Tensor, step: float, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` in one fused kernel, straight-through
    gradient inside the range (torch.fake_quantize_per_tensor_affine)."""
    return torch.fake_quantize_per_tensor_affine(x, step, 0, qmin, qmax)
