"""Convolutions of fake-quantized operands whose sums are computed exactly, as integers (CPU).

The proxies of sc and analog (SPEC 3.2, 3.3) accumulate quantized operands: stream
probabilities in [0, L] times weight codes in [0, L], or 8-bit inputs in [0, 255] times weight
magnitudes in [0, 127], once per weight sign. In float32 those are two convolutions per layer
where the float layer runs one; as one integer convolution over both signs (oneDNN's int8 one,
``approxctl.backends.cpu_int8``: with VNNI, or without it where pairs of products fit 16 bits,
``PairCodes``) they cost about one float convolution on this project's layers, and their sums
are exact. Inject mode uses them on CPU (``ApproxLayer.integer_sums``).

Values: ``float32(sum_k codes_k * w_codes_k) * out_scale``, the exact integer sum rounded once to
float32 (it is already exact below 2^24, which covers every sc layer up to K = 16384). Where the
int8 convolution is unavailable the same values come from a float32 convolution of the integer
codes while the sums provably stay below 2^24, else from a float64 one (exact), so results do
not depend on the CPU (``exact_sums`` says how it proves it).

Gradients: the float accumulations' (``approxctl.sign_pair`` takes these sums as its forward
values), so the backward is what it is for the float proxy.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from approxctl.backends import cpu_int8
from approxctl.noise import use_kernels
from approxctl.proxy_ops import kernel_noise, masked_gradient

try:
    from approxctl.backends import cpu_codes
except ImportError:  # numba missing: callers check ``usable`` first
    cpu_codes = None  # type: ignore[assignment]

# Layers with fewer products per output (a first layer's 5x5 window on one channel: 25;
# depthwise convs) are bound by memory, not by multiply-adds: there the integer path's extra
# passes (the codes, the sums' transpose) cost more than its cheaper multiply-adds save. TinyConv
# at batch 128, sc and analog inject: with the first layer (K = 25) on this path too the step
# measured 3% (sc) and 7% (analog) slower than without; the other layers (K = 800) on it made
# the step 8% faster (docs/design.md, "Proxies"). approx-mult's fused path
# (``approxctl.quantized_conv``) follows the same rule: 1-3% faster steps without the first layer.
MIN_REDUCTION = 64
_FLOAT32_EXACT = 1 << 24  # integers up to this magnitude, and sums of them, are exact in float32


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def args(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
        return self.stride, self.padding, self.dilation, self.groups


def usable(x: torch.Tensor) -> bool:
    """Whether the integer path serves this input: CPU float32 (N, C, H, W), numba present."""
    return cpu_codes is not None and x.dim() == 4 and use_kernels(x)


def exact_sums(
    codes: torch.Tensor,
    zero_point: int,
    w_codes: torch.Tensor,
    geometry: ConvGeometry,
    bound: int,
    code_max: int = 255,
) -> torch.Tensor:
    """``conv2d(codes - zero_point, w_codes)`` as float32 values of the exact integer sums
    (rounded once, to nearest even, where they exceed 2^24). ``codes`` uint8 (N, C, H, W) in
    [0, ``code_max``], ``w_codes`` int8 (O, C / groups, kh, kw); ``bound`` >= every |sum| of
    |products|, which decides whether the float32 fallback is exact. The result may be
    channels-last.

    oneDNN's int8 convolution runs it where it is exact for these operands
    (``cpu_int8.exact_for``: with VNNI always, else while pairs of products fit 16 bits).

    Without the int8 convolution, sums that may pass 2^24 still run in float32 first when every
    product is non-negative (no zero point, weight codes >= 0: sc's and analog's per-sign
    sums): every partial sum that a direct or GEMM convolution (torch's on CPU) adds up then
    lies between 0 and the total, and float rounding is monotone, so a float32 total below 2^24
    proves that no partial sum was rounded. Only a result at or above 2^24 is computed again in
    float64 (analog's K = 800 layers bound their sums at 2.6e7, but trained models' reach about
    1e6). Before that, 255 times the largest sum of one output channel's weight codes bounds
    every sum too: where it is below 2^24 (trained weights' usually are), the float32
    convolution needs no check of its output.
    """
    if cpu_int8.exact_for(code_max, magnitude_max(w_codes)):
        return cpu_int8.conv2d(codes, zero_point, w_codes, *geometry.args)
    if bound < _FLOAT32_EXACT:
        return _conv_of_ints(codes, zero_point, w_codes, geometry, torch.float32)
    if zero_point == 0 and int(w_codes.min()) >= 0:  # non-negative products
        # No sum passes 255 times its channel's weight-code sum: trained weights prove most
        # layers exact this way, with no pass over the output
        if 255 * int(w_codes.flatten(1).sum(1, dtype=torch.int64).max()) < _FLOAT32_EXACT:
            return _conv_of_ints(codes, zero_point, w_codes, geometry, torch.float32)
        sums = _conv_of_ints(codes, zero_point, w_codes, geometry, torch.float32)
        if float(sums.max()) < _FLOAT32_EXACT:
            return sums
    return _conv_of_ints(codes, zero_point, w_codes, geometry, torch.float64).to(torch.float32)


def magnitude_max(w_codes: torch.Tensor) -> int:
    """The largest |code| of int8 weights (128 for -128)."""
    return max(int(w_codes.max()), -int(w_codes.min()), 0)


def _conv_of_ints(
    codes: torch.Tensor,
    zero_point: int,
    w_codes: torch.Tensor,
    geometry: ConvGeometry,
    dtype: torch.dtype,
    factor: float = 1.0,
) -> torch.Tensor:
    """The convolution of the codes in ``dtype``, times ``factor`` (folded into the weights:
    exact only for a power of two)."""
    ints = codes.to(dtype)
    if zero_point:
        ints.sub_(zero_point)
    weights = w_codes.to(dtype)
    if factor != 1.0:
        weights.mul_(factor)
    return F.conv2d(ints, weights, None, *geometry.args)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


_EMPTY_U64 = np.empty(0, dtype=np.uint64)
# quantize_planes packs 8 channels' codes in one 64-bit word, lowest channel in the low byte
_WORDS = sys.byteorder == "little"


class _FakeQuantCodes(torch.autograd.Function):
    """``fake_quant(x, step, 0, qmax)`` forward, with the codes (channels-last) as a second
    output that wants no gradient (``nans`` gets the number of NaN inputs appended); the
    straight-through gradient where ``inside`` is set backward."""

    @staticmethod
    def forward(ctx, x, step, qmax, nans):  # type: ignore[no-untyped-def]
        x = x.contiguous()
        samples, channels, height, width = x.shape
        codes = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        inside = torch.empty(x.shape, dtype=torch.uint8)
        out = torch.empty(x.shape)
        flat = codes.permute(0, 2, 3, 1).view(-1).numpy()
        words = flat.view(np.uint64) if _WORDS and channels % 8 == 0 else _EMPTY_U64
        found, outside = 0, 0
        if x.numel():  # the kernel cuts its work by samples and pixels: none for no element
            found, outside = cpu_codes.quantize_planes(
                _flat(x), samples, height * width, np.float32(1.0) / np.float32(step),
                np.float32(step), np.float32(qmax), flat, words, _flat(inside), _flat(out),
            )  # fmt: skip
        nans.append(int(found))
        ctx.mark_non_differentiable(codes)
        # Every input in range (the usual case: activations within their calibrated range):
        # the gradient passes unchanged, with no pass over it.
        ctx.all_inside = outside == 0
        ctx.save_for_backward(None if ctx.all_inside else inside)
        return out, codes

    @staticmethod
    def backward(ctx, grad, _):  # type: ignore[no-untyped-def]
        if ctx.all_inside:
            return grad, None, None, None
        (inside,) = ctx.saved_tensors
        return masked_gradient(grad, inside), None, None, None


def fake_quant_codes(
    x: torch.Tensor, step: float, qmax: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fake_quant(x, step, 0, qmax)`` (bit for bit, and its gradient) and its integer codes
    (uint8, in [0, qmax <= 255]; channels-last memory order, which oneDNN's int8 convolution
    reads), in one pass over ``x`` (N, C, H, W).

    The codes are None where ``x`` holds NaN: the caller then accumulates in float, so a
    diverged input stays NaN in the outputs it reaches, as on every other path."""
    nans: list[int] = []
    out, codes = _FakeQuantCodes.apply(x, step, qmax, nans)
    return out, (None if nans[0] else codes)


def integer_sums_nchw(
    codes: torch.Tensor,
    w_codes: torch.Tensor,
    out_scale: float,
    geometry: ConvGeometry,
    bound: int,
    code_max: int = 255,
) -> torch.Tensor:
    """``exact_sums(codes, 0, w_codes) * out_scale`` as a contiguous (N, C, H, W) float32
    tensor, whatever memory order the convolution wrote."""
    int8 = cpu_int8.exact_for(code_max, magnitude_max(w_codes))
    if not int8 and bound < _FLOAT32_EXACT and math.frexp(out_scale)[0] == 0.5:
        # a power-of-two scale (sc's) folded into the float32 weights keeps every product and
        # partial sum exact, and saves the output pass below
        return _conv_of_ints(codes, 0, w_codes, geometry, torch.float32, out_scale).contiguous()
    acc = exact_sums(codes, 0, w_codes, geometry, bound, code_max)
    if out_scale == 1.0 and acc.is_contiguous():  # analog's sums from a float32 convolution
        return acc  # (no VNNI): already the values, in order; the pass below would copy them
    if not (acc.is_contiguous() or acc.is_contiguous(memory_format=torch.channels_last)):
        acc = acc.contiguous()
    # By the output pass of the integer convolutions (a tiled transpose; torch's strided copy
    # measured 2-3x slower here).
    samples, channels, height, width = acc.shape
    stride_n, stride_c, _, stride_w = acc.stride()
    out = torch.empty(acc.shape)
    cpu_codes.affine_output(
        acc.as_strided((acc.numel(),), (1,)).numpy(), stride_n, stride_c, stride_w,
        samples, height * width, False, *kernel_noise(None),
        np.ones(channels, dtype=np.float32), np.float32(out_scale),
        np.zeros(channels, dtype=np.float32), _flat(out),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class PairCodes:
    """The integer operands of a positive- and a negative-weight accumulation of one input:
    ``x`` uint8 codes in [0, ``code_max``], ``w_pos`` / ``w_neg`` int8 codes (both >= 0),
    ``bound`` as in ``exact_sums``; ``out_scale`` = the float operands over their codes (x / x
    codes * w / w codes), so the sums times it are the float accumulations up to rounding."""

    x: torch.Tensor
    w_pos: torch.Tensor
    w_neg: torch.Tensor
    out_scale: float
    bound: int
    code_max: int = 255

    def sums(self, geometry: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Both accumulations' values, as ``integer_sums_nchw`` gives them: by one int8
        convolution of both weight signs where that is exact, else one convolution each."""
        both = self._int8_pair(geometry)
        if both is not None:
            return both
        return (
            integer_sums_nchw(self.x, self.w_pos, self.out_scale, geometry, self.bound,
                              self.code_max),
            integer_sums_nchw(self.x, self.w_neg, self.out_scale, geometry, self.bound,
                              self.code_max),
        )  # fmt: skip

    def _int8_pair(self, geometry: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both sums from one int8 convolution over [w+; w-] (sums as ``exact_sums`` rounds
        them), or None where the CPU cannot compute it exactly.

        Without VNNI, analog's operands (codes to 255, weights to 127) overflow the 16-bit pair
        sums (``cpu_int8``); weights in [0, w_max] shifted to [-s, w_max - s], s = ceil(w_max
        / 2), halve the largest product, and ``s`` times each window's sum of codes (a
        one-channel convolution per group) is added back in the output pass. Both terms are
        exact in float32 (checked: ``code_max * s * K < 2^24``), so their sum is the exact sum
        rounded once."""
        w_max = max(magnitude_max(self.w_pos), magnitude_max(self.w_neg))
        shift = 0
        if not cpu_int8.exact_for(self.code_max, w_max):
            shift = (w_max + 1) // 2
            reduction = self.w_pos[0].numel()
            if not cpu_int8.exact_for(self.code_max, shift) or (
                self.code_max * shift * reduction >= _FLOAT32_EXACT
            ):
                return None
        groups = geometry.groups  # each group's output channels: its w+ ones, then its w- ones
        weights = torch.cat(
            [self.w_pos.unflatten(0, (groups, -1)), self.w_neg.unflatten(0, (groups, -1))], 1
        ).flatten(0, 1)
        if shift:
            weights = (weights.to(torch.int16) - shift).to(torch.int8)
        acc = cpu_int8.conv2d(self.x, 0, weights, *geometry.args)
        window = _window_sums(self.x, self.w_pos.shape[2:], geometry) if shift else None
        samples, channels, height, width = acc.shape
        stride_n, stride_c, _, stride_w = acc.stride()  # either order: pixel p at p * stride_w
        out_pos = torch.empty(samples, channels // 2, height, width)
        out_neg = torch.empty(out_pos.shape)
        cpu_codes.pair_outputs(
            acc.as_strided((acc.numel(),), (1,)).numpy(), stride_n, stride_c, stride_w,
            samples, height * width, _EMPTY_F32 if window is None else _flat(window),
            geometry.groups, np.float32(shift), np.float32(self.out_scale), _flat(out_pos),
            _flat(out_neg),
        )  # fmt: skip
        return out_pos, out_neg


_EMPTY_F32 = np.empty(0, dtype=np.float32)


def _window_sums(codes: torch.Tensor, kernel: torch.Size, geometry: ConvGeometry) -> torch.Tensor:
    """Each output position's sum of the codes its window reads, over its group's channels:
    (N, groups, Ho, Wo) float32, exact (at most 255 * K < 2^24 where ``_int8_pair`` uses it).
    One numba pass over channels-last codes (``cpu_codes.window_sums``; the codes come so from
    ``fake_quant_codes``): a channel sum and a one-channel convolution of ones in torch measured
    0.75 ms for TinyConv's second layer at batch 128, this 0.33."""
    codes = codes.contiguous(memory_format=torch.channels_last)
    samples, channels, height, width = codes.shape
    stride, padding, dilation, groups = geometry.args
    out_h, out_w = (
        (size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i, size in enumerate((height, width))
    )
    out = torch.empty(samples, groups, out_h, out_w)
    cpu_codes.window_sums(
        _flat(codes.permute(0, 2, 3, 1)),
        np.array((samples, channels, height, width, groups, out_h, out_w), np.int64),
        np.array((*kernel, *stride, *padding, *dilation), np.int64), _flat(out),
    )  # fmt: skip
    return out
