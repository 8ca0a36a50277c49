"""Analog's proxy on a convolution with few products per output (a first layer) as one
autograd node with its accumulations: ``approxctl.backends.cpu_hardtanh_conv``.

Analog_act (SPEC 3.3) of a signed input is four accumulations: the positive inputs x+ and the
negative inputs x- each against w+ and w-. Where each product is cheap (K = C/groups * kh * kw
below ``MIN_REDUCTION``: TinyConv's first layer has K = 25 and 4.2 M outputs at batch 128), the
four convolutions, the proxy kernel reading their four output maps, and the backward writing four
gradient maps and multiplying each with the input's patches, are bound by memory: measured on
the 2-core AMD EPYC (AVX2) CPU, that layer's proxy cost about 3.4 times its float convolution's
forward and backward. The fused kernels keep the four sums of one (sample, channel) in cache and
write only the output and a byte of masks; the backward reads the output gradient once.

Values: the sums are the exact integer sums of the operands' codes (8-bit input codes times
weight codes: below 2^24 for K < 64, so exact in float32 in any order), and the activation,
masks and drawn error are ``hardtanh_pairs``' on those sums, bit for bit. Gradients: d/dw and the
bias's, as autograd through ``conv2d`` of the float operands, ``max(w, 0)``/``max(-w, 0)`` and
``hardtanh_pairs`` gives them, up to float rounding. The input gets no gradient, so the node
serves only inputs that want none (a first layer's); stride 1 and zero padding only (``usable``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from approxctl.integer_conv import MIN_REDUCTION, ConvGeometry
from approxctl.noise import NoiseSpec, channel_vector, use_kernels
from approxctl.proxy_ops import kernel_noise

try:
    from approxctl.backends import cpu_hardtanh_conv
except ImportError:  # numba missing: ``usable`` says no
    cpu_hardtanh_conv = None  # type: ignore[assignment]


def usable(geometry: ConvGeometry, kernel: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether the fused node serves these inputs (N, C, H, W) and weights ``kernel``: CPU
    float32, finite, wanting no gradient; stride 1 and few products per output."""
    return (
        cpu_hardtanh_conv is not None and use_kernels(kernel, *inputs)
        and geometry.stride == (1, 1) and kernel[0].numel() < MIN_REDUCTION
        and all(x.dim() == 4 and not x.requires_grad for x in inputs)
        and all(bool(torch.isfinite(x).all()) for x in inputs)
    )  # fmt: skip


def _padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """Zero-padded planes with one spare row (the wide output's last reads run past a plane)."""
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph + 1)).contiguous()


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


class _HardTanhConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[no-untyped-def]
        ctx, w, x_pos, x_neg, codes_pos, codes_neg, w_codes, geometry, t, scale, bias, noise
    ):
        four = x_neg is not None
        ph, pw = geometry.padding
        dy, dx = geometry.dilation
        n, channels_in, height, width = x_pos.shape
        kh, kw = w.shape[2:]
        hp, wp = height + 2 * ph, width + 2 * pw
        out_h, out_w = hp - dy * (kh - 1), wp - dx * (kw - 1)
        plane = (hp + 1) * wp
        pos = _padded(codes_pos, geometry.padding)
        neg = _padded(codes_neg, geometry.padding) if four else pos
        channels = w.shape[0]
        out = torch.empty(n, channels, out_h, out_w)
        inside = torch.empty(out.shape, dtype=torch.uint8)
        cpu_hardtanh_conv.forward(
            _flat(pos), _flat(neg), four, w_codes.detach().contiguous().numpy(), channels_in,
            plane, wp, out_h, out_w, dy, dx, np.float32(t), channel_vector(scale, channels),
            channel_vector(0.0 if bias is None else bias, channels), noise is not None,
            *kernel_noise(noise), _flat(out), _flat(inside),
        )  # fmt: skip
        ctx.save_for_backward(w_codes, x_pos, x_neg if four else x_pos, inside, scale)
        ctx.four, ctx.geometry, ctx.sizes = four, geometry, (channels_in, plane, wp)
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        w_codes, x_pos, x_neg, inside, scale = ctx.saved_tensors
        channels_in, plane, wp = ctx.sizes
        dy, dx = ctx.geometry.dilation
        _, channels, out_h, out_w = grad.shape
        grad = grad.to(torch.float32).contiguous()
        grad_w = torch.zeros(w_codes.shape)
        sums = grad.new_empty(grad.shape[0] * channels)
        cpu_hardtanh_conv.backward(
            _flat(grad), _flat(inside), channel_vector(scale, channels),
            _flat(_padded(x_pos, ctx.geometry.padding)),
            _flat(_padded(x_neg, ctx.geometry.padding)), ctx.four,
            w_codes.detach().contiguous().numpy(), channels_in, plane, wp, out_h, out_w, dy, dx,
            grad_w.view(channels, -1).numpy(), sums.numpy(),
        )  # fmt: skip
        bias_grad = None
        if ctx.bias_shape is not None:
            bias_grad = sums.view(-1, channels).sum(0).view(ctx.bias_shape)
        return grad_w, None, None, None, None, None, None, None, None, bias_grad, None


def hardtanh_conv(
    w: torch.Tensor,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor | None,
    codes: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    geometry: ConvGeometry,
    t: float,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    noise: NoiseSpec | None = None,
) -> torch.Tensor:
    """``hardtanh_pairs`` of ``conv2d(x_pos, max(w, 0))``, ``conv2d(x_pos, max(-w, 0))`` [and
    the same of ``x_neg``], as in ``AnalogTarget.proxy``, with the sums computed exactly from
    ``codes`` = (x_pos's, x_neg's or None, w's): integer-valued float32 tensors, the float
    operands over their step. ``scale``/``bias`` per output channel; ``usable`` must hold."""
    codes_pos, codes_neg, w_codes = codes
    return _HardTanhConv.apply(
        w, x_pos, x_neg, codes_pos, codes_neg, w_codes, geometry, t, scale, bias, noise
    )

