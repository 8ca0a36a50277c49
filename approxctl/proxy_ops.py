"""Fused forward/backward pieces of an approximate layer (paper section 3.1, Table 3).

The proxies take the positive- and negative-weight accumulations and return float outputs
``act * scale + bias`` directly: one autograd node per layer, with the least saved state, instead
of two activations, a subtraction and an affine map, each with its own saved tensors. In
``inject`` mode they also add the injected error drawn at the activation's value (SPEC section 4).
On CPU float32 tensors the forward and the backward are one numba pass each
(``approxctl.backends.cpu_pointwise``), on CUDA float32 tensors one CUDA kernel each where CuPy
is installed (``approxctl.backends.cuda_pointwise``); elsewhere they are composed torch ops.
(The two accumulations are separate convolutions: oneDNN runs two convs with O outputs
markedly faster than one with 2O for this project's layer shapes, measured on the CI CPU.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from approxctl.backends import cuda_pointwise
from approxctl.noise import (
    TABLE_BITS,
    ChannelLayout,
    NoiseSpec,
    channel_vector,
    cpu_pointwise,
    normal_quantiles,
    use_kernels,
)

if TYPE_CHECKING:
    from approxctl.sign_pair import Negation  # imports this module

_NO_NOISE_DEGREE = (np.float32(0.0),)
_NO_BOUNDS = np.array([-np.inf, np.inf, np.inf], dtype=np.float32)


def kernel_noise(noise: NoiseSpec | None) -> tuple[object, ...]:
    if noise is not None:
        return noise.kernel_args()
    # Typed placeholders (numba compiles one specialization); the kernels skip the draw.
    table = normal_quantiles().numpy()
    return (np.uint32(0), _NO_NOISE_DEGREE, _NO_NOISE_DEGREE, np.float32(-1.0),
            np.float32(1.0), _NO_BOUNDS, table, np.uint32(32 - TABLE_BITS))  # fmt: skip


def _affine_(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out.mul_(scale)
    return out if bias is None else out.add_(bias)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


def _bias_grad(sums: torch.Tensor, channels: int, shape: torch.Size) -> torch.Tensor:
    """The bias gradient from per-(sample, channel) sums of the output gradient."""
    return sums.view(-1, channels).sum(0).view(shape)


class _ScActivation(torch.autograd.Function):
    """(SC_act + error) * scale + bias with SC_act = (1 - e^-z_pos) - (1 - e^-z_neg)."""

    @staticmethod
    def forward(ctx, z_pos, z_neg, scale, bias, layout, noise):  # type: ignore[no-untyped-def]
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.layout = layout
        ctx.fused = layout is not None and use_kernels(z_pos, z_neg)
        ctx.cuda = layout is not None and cuda_pointwise.usable(z_pos, z_neg)
        if ctx.cuda:
            out, e_pos, e_neg, ctx.scale_vector = cuda_pointwise.sc_forward(
                z_pos, z_neg, scale, bias, layout, noise
            )
            ctx.save_for_backward(e_pos, e_neg, scale)
            return out.view(z_pos.shape)
        if ctx.fused:
            z_pos, z_neg = z_pos.contiguous(), z_neg.contiguous()
            out, e_pos, e_neg = (torch.empty_like(z_pos) for _ in range(3))
            channels = layout.channels
            cpu_pointwise.sc_proxy_forward(
                _flat(z_pos), _flat(z_neg), channel_vector(scale, channels),
                channel_vector(0.0 if bias is None else bias, channels), layout.inner,
                noise is not None, *kernel_noise(noise), _flat(out), _flat(e_pos), _flat(e_neg),
            )  # fmt: skip
            ctx.save_for_backward(e_pos, e_neg, scale)
            return out
        e_pos, e_neg = torch.exp(-z_pos), torch.exp(-z_neg)
        ctx.save_for_backward(e_pos, e_neg, scale)
        v = e_neg - e_pos
        if noise is not None:
            v = v + noise.draw_torch(v)
        return _affine_(v, scale, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        e_pos, e_neg, scale = ctx.saved_tensors
        if ctx.cuda:
            grad_pos, grad_neg = cuda_pointwise.sc_backward(
                grad, e_pos, e_neg, ctx.scale_vector, ctx.layout
            )
            bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
            return grad_pos.view(grad.shape), grad_neg.view(grad.shape), None, bias_grad, None, None
        if ctx.fused:
            layout = ctx.layout
            grad = grad.to(torch.float32).contiguous()
            grad_pos, grad_neg = torch.empty_like(grad), torch.empty_like(grad)
            sums = grad.new_empty(grad.numel() // layout.inner)
            cpu_pointwise.sc_proxy_backward(
                _flat(grad), _flat(e_pos), _flat(e_neg), channel_vector(scale, layout.channels),
                layout.inner, _flat(grad_pos), _flat(grad_neg), sums.numpy(),
            )  # fmt: skip
            bias_grad = (
                None if ctx.bias_shape is None
                else _bias_grad(sums, layout.channels, ctx.bias_shape)
            )  # fmt: skip
            return grad_pos, grad_neg, None, bias_grad, None, None
        bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
        grad = grad * scale  # d/dz_pos = exp(-z_pos), d/dz_neg = -exp(-z_neg)
        return grad * e_pos, -grad * e_neg, None, bias_grad, None, None


class _HardTanhPairs(torch.autograd.Function):
    """(Analog_act + error) * scale + bias, Analog_act = clamp(z_pos, 0, T) - clamp(z_neg, 0, T)
    of the positive inputs, minus the same of the negative inputs when given."""

    @staticmethod
    def forward(ctx, t, scale, bias, layout, noise, negations, *zs):  # type: ignore[no-untyped-def]
        # zs: z_pos, z_neg of the positive inputs [, z_pos, z_neg of the negative inputs].
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.layout = layout
        ctx.fused = layout is not None and use_kernels(*zs)
        ctx.cuda = layout is not None and cuda_pointwise.usable(*zs)
        ctx.terms = len(zs)
        if ctx.cuda:
            out, inside, ctx.scale_vector = cuda_pointwise.hardtanh_forward(
                zs, t, scale, bias, layout, noise
            )
            ctx.save_for_backward(inside, scale)
            return out.view(zs[0].shape)
        if ctx.fused:
            zs = tuple(z.contiguous() for z in zs)
            out = torch.empty_like(zs[0])
            inside = torch.empty(zs[0].shape, dtype=torch.uint8)
            channels = layout.channels
            flat = [_flat(z) for z in zs]
            cpu_pointwise.hardtanh_proxy_forward(
                *(flat if len(flat) == 4 else flat * 2), len(flat) == 4, np.float32(t),
                channel_vector(scale, channels),
                channel_vector(0.0 if bias is None else bias, channels), layout.inner,
                noise is not None, *kernel_noise(noise), _flat(out), _flat(inside),
            )  # fmt: skip
            ctx.negations = negations or ()
            ctx.save_for_backward(inside, scale)
            return out
        clamped = [z.clamp(0, t) for z in zs]
        v = clamped[0] - clamped[1]
        if len(zs) == 4:
            v = v - (clamped[2] - clamped[3])
        ctx.save_for_backward(*((z >= 0) & (z <= t) for z in zs), scale)
        if noise is not None:
            v = v + noise.draw_torch(v)
        return _affine_(v, scale, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        *masks, scale = ctx.saved_tensors
        if ctx.cuda:  # masks = [inside], as below
            grads = cuda_pointwise.hardtanh_backward(
                grad, masks[0], ctx.scale_vector, ctx.layout, ctx.terms
            )
            bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
            return None, None, bias_grad, None, None, None, *(g.view(grad.shape) for g in grads)
        if ctx.fused:  # masks = [inside]: bit j for the j-th accumulation
            layout = ctx.layout
            grad = grad.to(torch.float32).contiguous()
            grads = [torch.empty_like(grad) for _ in range(ctx.terms)]
            sums = grad.new_empty(grad.numel() // layout.inner)
            flat = [_flat(g) for g in grads]
            nonzeros = np.zeros(2, dtype=np.int64)
            cpu_pointwise.hardtanh_proxy_backward(
                _flat(grad), _flat(masks[0]), channel_vector(scale, layout.channels),
                layout.inner, *(flat if len(flat) == 4 else flat * 2), len(flat) == 4,
                sums.numpy(), nonzeros,
            )  # fmt: skip
            for negation, count in zip(ctx.negations, nonzeros, strict=False):
                negation.certain = bool(count == 0)
            bias_grad = (
                None if ctx.bias_shape is None
                else _bias_grad(sums, layout.channels, ctx.bias_shape)
            )  # fmt: skip
            return None, None, bias_grad, None, None, None, *grads
        bias_grad = None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)
        grad = grad * scale
        signs = (1.0, -1.0, -1.0, 1.0)
        grads = [mask * (grad * sign) for mask, sign in zip(masks, signs, strict=False)]
        return None, None, bias_grad, None, None, None, *grads


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
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    layout: ChannelLayout | None = None,
    noise: NoiseSpec | None = None,
) -> torch.Tensor:
    """``scale`` and ``bias`` broadcast per output channel; ``scale`` carries no gradient.

    ``layout`` (how channels lie in the contiguous output) enables the fused CPU kernels;
    ``noise`` adds the injected error drawn at the activation's value (inject mode).
    """
    return _ScActivation.apply(z_pos, z_neg, scale, bias, layout, noise)


def hardtanh_pairs(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    t: float,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    layout: ChannelLayout | None = None,
    noise: NoiseSpec | None = None,
    negations: Sequence[Negation] | None = None,
) -> torch.Tensor:
    """Analog_act of ``pairs[0]`` = (z_pos, z_neg), minus that of ``pairs[1]`` if given (the
    negative inputs' pass, SPEC 3.3), then (+ error) * scale + bias. ``negations``, one per
    pair: marked certain by the CPU kernel's backward where the gradients it sends to z_pos
    and z_neg add up to zero everywhere (each other's negation)."""
    if not 1 <= len(pairs) <= 2:
        raise ValueError("hardtanh_pairs takes one or two (z_pos, z_neg) pairs")
    zs = (z for pair in pairs for z in pair)
    return _HardTanhPairs.apply(t, scale, bias, layout, noise, negations, *zs)


def hardtanh_pair(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    t: float,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return hardtanh_pairs([(z_pos, z_neg)], t, scale, bias)


def straight_through(
    proxy: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Forward ``exact * scale + bias``, backward straight into ``proxy``."""
    return _ForwardValue.apply(proxy, exact.detach(), scale.detach(), bias.detach())


class _FakeQuant(torch.autograd.Function):
    """torch.fake_quantize_per_tensor_affine (zero point 0) in one numba pass each way."""

    @staticmethod
    def forward(ctx, x, step, qmin, qmax):  # type: ignore[no-untyped-def]
        x = x.contiguous()
        out = torch.empty_like(x)
        inside = torch.empty(x.shape, dtype=torch.uint8)
        inv_step = np.float32(1.0) / np.float32(step)  # as ATen: float32 reciprocal
        cpu_pointwise.fake_quant_forward(
            _flat(x), inv_step, np.float32(step), np.float32(qmin), np.float32(qmax),
            _flat(out), _flat(inside),
        )  # fmt: skip
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (inside,) = ctx.saved_tensors
        return masked_gradient(grad, inside), None, None, None


def masked_gradient(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``inside`` (uint8) is set, else 0: the straight-through gradient of a
    quantization, in one numba pass for float32 (a torch multiply for other dtypes)."""
    if grad.dtype != torch.float32:
        return grad * inside
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    cpu_pointwise.masked_grad(_flat(grad), _flat(inside), _flat(out))
    return out


def fake_quant(x: torch.Tensor, step: float, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` in one fused pass, straight-through
    gradient inside the range: torch.fake_quantize_per_tensor_affine's arithmetic, bit for bit
    (numba kernels on CPU float32, the torch op elsewhere), except that NaN stays NaN where
    torch's CPU kernel returns ``qmin * step``: a diverged input then reaches the loss."""
    if use_kernels(x):
        return _FakeQuant.apply(x, step, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, step, 0, qmin, qmax)
