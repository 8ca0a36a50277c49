"""sc's and analog's proxies on a convolution with few products per output (a first layer) as
one autograd node with their accumulations: ``approxctl.backends.cpu_fused_conv``.

A signed input makes either proxy four accumulations: the positive inputs x+ and the negative
inputs x- each against w+ and w- (SPEC 3.2, 3.3). Where each product is cheap (K = C/groups *
kh * kw below ``MIN_REDUCTION``: TinyConv's first layer has K = 25 and 4.2 M outputs at batch
128), the separate convolutions, the proxy kernel reading their output maps, and the backward
writing gradient maps and multiplying each with the input's patches, are bound by memory. The
fused kernels keep the four sums of one (sample, output channel) in cache and write only the
output and what the backward needs (analog: a byte of masks; sc: e+-), and the backward reads
the output gradient once and accumulates the weight gradients directly (docs/design.md,
"Proxies", has the measurements).

Values: the sums are the exact integer sums of the operands' codes (below 2^24 for K < 64 with
8-bit codes, so exact in float32 in any order), and the activation, masks or e+- and the drawn
error are those of ``hardtanh_pairs`` / ``sc_activation`` on those sums, bit for bit (as on the
integer path of ``integer_conv``). Gradients: those of w+ and w- (where the caller's chain wants
them, ``wanted``) and of the bias, as autograd through ``conv2d`` of the float operands and the
unfused proxy gives them, up to float rounding. The input gets no gradient, so the node serves
only inputs that want none (a first layer's); stride 1 and zero padding only (``usable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from approxctl.integer_conv import MIN_REDUCTION, ConvGeometry
from approxctl.noise import NoiseSpec, channel_vector, use_kernels
from approxctl.proxy_ops import kernel_noise

try:
    from approxctl.backends import cpu_fused_conv
except ImportError:  # numba missing: ``usable`` says no
    cpu_fused_conv = None  # type: ignore[assignment]

_EMPTY_F32 = np.empty(0, dtype=np.float32)
_EMPTY_U8 = np.empty(0, dtype=np.uint8)


@dataclass(frozen=True)
class Proxy:
    """Which proxy, and its constant: analog's clamp ``t`` (products), or sc's ``unit`` (from
    the integer sums to z, 1 / L^2)."""

    kind: str  # "analog" or "sc"
    t: float = 0.0
    unit: float = 1.0


@dataclass(frozen=True)
class Codes:
    """The operands' integer codes as integer-valued float32 tensors: the inputs' (x- None for
    an unsigned input) and the weights' magnitudes per sign, w+ and w- on disjoint positions."""

    x_pos: torch.Tensor
    x_neg: torch.Tensor | None
    w_pos: torch.Tensor
    w_neg: torch.Tensor

    @classmethod
    def of(
        cls,
        inputs: list[torch.Tensor],
        step: torch.Tensor,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
    ) -> Codes:
        """From fake-quantized inputs (codes times ``step``, [x+] or [x+, x-]): each over the
        step, rounded, is its code exactly (the quotient is within a few ulps of it)."""
        x = [torch.round(t.detach() / step) for t in inputs]
        return cls(x[0], x[1] if len(x) == 2 else None, w_pos.detach(), w_neg.detach())


def usable(geometry: ConvGeometry, kernel: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether the fused node serves these inputs (N, C, H, W) and weights ``kernel``: CPU
    float32, finite, wanting no gradient; stride 1 and few products per output."""
    return (
        cpu_fused_conv is not None and use_kernels(kernel, *inputs)
        and geometry.stride == (1, 1) and kernel[0].numel() < MIN_REDUCTION
        and all(x.dim() == 4 and not x.requires_grad for x in inputs)
        and all(_finite(x) for x in inputs)
    )  # fmt: skip


def _finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, or (rarely) a false no: a NaN or infinity
    anywhere makes the sum NaN or infinite, and finite values only where the sum overflows.
    One reduction, where ``isfinite(x).all()`` writes and reads a mask."""
    return bool(torch.isfinite(x.sum()))


def _padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """Zero-padded planes with one spare row (the wide output's last reads run past a plane)."""
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph + 1)).contiguous()


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[no-untyped-def]
        ctx, w_pos, w_neg, x_pos, x_neg, codes, wanted, geometry, proxy, scale, bias, noise
    ):
        four = x_neg is not None
        kind = cpu_fused_conv.ANALOG if proxy.kind == "analog" else cpu_fused_conv.SC
        ph, pw = geometry.padding
        dy, dx = geometry.dilation
        n, channels_in, height, width = x_pos.shape
        channels, _, kh, kw = w_pos.shape
        hp, wp = height + 2 * ph, width + 2 * pw
        out_h, out_w = hp - dy * (kh - 1), wp - dx * (kw - 1)
        sizes = (channels_in, (hp + 1) * wp, wp, out_h, out_w, dy, dx)
        pos = _padded(codes.x_pos, geometry.padding)
        neg = _padded(codes.x_neg, geometry.padding) if four else pos
        out = torch.empty(n, channels, out_h, out_w)
        kept: tuple[torch.Tensor, ...]
        if kind == cpu_fused_conv.ANALOG:
            kept = (torch.empty(out.shape, dtype=torch.uint8),)
            arrays = (_flat(kept[0]), _EMPTY_F32, _EMPTY_F32)
        else:
            kept = (torch.empty(out.shape), torch.empty(out.shape))
            arrays = (_EMPTY_U8, _flat(kept[0]), _flat(kept[1]))
        signed = (codes.w_pos - codes.w_neg).contiguous()
        cpu_fused_conv.forward(
            kind, _flat(pos), _flat(neg), four, signed.numpy(), *sizes, np.float32(proxy.t),
            np.float32(proxy.unit), channel_vector(scale, channels),
            channel_vector(0.0 if bias is None else bias, channels), noise is not None,
            *kernel_noise(noise), _flat(out), *arrays,
        )  # fmt: skip
        ctx.save_for_backward(wanted, x_pos, x_neg if four else x_pos, scale, *kept)
        ctx.kind, ctx.four, ctx.geometry, ctx.sizes = kind, four, geometry, sizes
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        wanted, x_pos, x_neg, scale, *kept = ctx.saved_tensors
        channels = wanted.shape[0]
        if ctx.kind == cpu_fused_conv.ANALOG:
            arrays = (_flat(kept[0]), _EMPTY_F32, _EMPTY_F32)
        else:
            arrays = (_EMPTY_U8, _flat(kept[0]), _flat(kept[1]))
        grad = grad.to(torch.float32).contiguous()
        grad_w = torch.zeros(2, channels, wanted[0].numel())
        sums = grad.new_empty(grad.shape[0] * channels)
        cpu_fused_conv.backward(
            ctx.kind, _flat(grad), *arrays, channel_vector(scale, channels),
            _flat(_padded(x_pos, ctx.geometry.padding)),
            _flat(_padded(x_neg, ctx.geometry.padding)), ctx.four,
            wanted.contiguous().numpy(), *ctx.sizes, grad_w.numpy(), sums.numpy(),
        )  # fmt: skip
        bias_grad = None
        if ctx.bias_shape is not None:
            bias_grad = sums.view(-1, channels).sum(0).view(ctx.bias_shape)
        grad_pos, grad_neg = (g.view(wanted.shape) for g in grad_w)
        return grad_pos, grad_neg, None, None, None, None, None, None, None, bias_grad, None


def fused_conv(
    w_pos: torch.Tensor,
    w_neg: torch.Tensor,
    x_pos: torch.Tensor,
    x_neg: torch.Tensor | None,
    codes: Codes,
    wanted: torch.Tensor,
    geometry: ConvGeometry,
    proxy: Proxy,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    noise: NoiseSpec | None = None,
) -> torch.Tensor:
    """The proxy's output (bias, scale and injected error included) of the accumulations
    ``conv2d(x_pos, w_pos)``, ``conv2d(x_pos, w_neg)`` [and the same of ``x_neg``], as
    ``AnalogTarget.proxy`` / ``ScTarget.proxy`` compute it unfused, with the sums computed
    exactly from ``codes`` (the float operands over their steps).

    ``wanted`` (float32, the weights' shape): w_pos's gradient is computed where it is > 0,
    w_neg's where it is < 0, and is zero elsewhere: only for a caller whose chain passes no
    gradient there (w+ = max(w, 0) and w- = max(-w, 0) of one weight w, with ``wanted`` = w).
    ``scale``/``bias`` per output channel; ``usable`` must hold."""
    return _FusedConv.apply(
        w_pos, w_neg, x_pos, x_neg, codes, wanted, geometry, proxy, scale, bias, noise
    )
