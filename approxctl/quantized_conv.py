"""A convolution of quantized operands as one integer convolution: approx-mult's inject forward
on CPU.

approx-mult's proxy (SPEC 3.1) is the plain accumulation of its quantized operands,
``sum_k q_a q_w``, and inject mode adds the error drawn at that value (SPEC section 4). Here the
accumulation is computed as what it is, an integer convolution of 8-bit operands
(``approxctl.integer_conv.exact_sums``: oneDNN's int8 convolution where the CPU runs it exactly,
else a float32 convolution of the integer values while that is exact, below 2^24, else a float64
one). Every way gives the same bits, so runs do not depend on which one ran.
The float outputs are ``(acc + error(acc)) * a_step * w_scale[c] + bias[c]``, written with the
error in one pass (``approxctl.backends.cpu_codes``).

The backward is the float layer's: ``convolution_backward`` on the fake-quantized input and
weights, the same call with the same operands as the float proxy's autograd, so the gradients
are those of ``conv2d(fake_quant(x), q_w * w_scale) + bias`` bit for bit. Only 8-bit codes and
the in-range mask are saved (2 bytes per input element, where the float proxy saves 5) and
nothing of the output's size; under gradient checkpointing, the float input alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from approxctl import integer_conv
from approxctl.integer_conv import ConvGeometry, exact_sums
from approxctl.noise import NoiseSpec, cpu_pointwise
from approxctl.proxy_ops import kernel_noise, masked_gradient

try:
    from approxctl.backends import cpu_codes
except ImportError:  # numba missing: callers check ``usable`` first
    cpu_codes = None  # type: ignore[assignment]


def usable(x: torch.Tensor, qmax: int) -> bool:
    """Whether ``quantized_conv2d`` serves this input: CPU float32 (N, C, H, W), the numba
    kernels present, and codes that fit 8 bits (|q| <= 127)."""
    return integer_conv.usable(x) and qmax <= 127


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(-1).numpy()


_ZERO_POINT = 128  # codes q + 128 in [1, 255]: oneDNN's int8 convolution takes unsigned inputs


def _zero_point(x: torch.Tensor) -> int:
    """0 for an input with no negative value (after a ReLU: every layer but a first), so its
    codes stay within [0, 127], where oneDNN's int8 convolution is exact without VNNI too
    (``cpu_int8.exact_for``); else ``_ZERO_POINT``. The sums do not depend on it."""
    return 0 if bool(x.min() >= 0) else _ZERO_POINT


class _QuantizedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias, step, qmax, geometry, noise, keep_input):  # type: ignore[no-untyped-def]
        x = x.contiguous()
        zero_point = _zero_point(x)
        codes = torch.empty(x.shape, dtype=torch.uint8)
        inside = torch.empty(x.shape, dtype=torch.uint8)
        nans = cpu_codes.quantize_codes(
            _flat(x), np.float32(1.0) / np.float32(step), np.float32(-qmax), np.float32(qmax),
            np.int32(zero_point), _flat(codes), _flat(inside),
        )  # fmt: skip
        w_q = w_q.detach()
        conv = geometry.args
        if nans == 0:
            bound = qmax**2 * w_q[0].numel()
            acc = exact_sums(
                codes, zero_point, w_q.to(torch.int8), geometry, bound, code_max=zero_point + qmax
            )
        else:  # a diverged input stays NaN in the outputs that see it, as in float
            ints = codes.to(torch.float32).sub_(zero_point)
            ints[torch.isnan(x)] = float("nan")
            acc = F.conv2d(ints, w_q, None, *conv)
        if not (acc.is_contiguous() or acc.is_contiguous(memory_format=torch.channels_last)):
            acc = acc.contiguous()
        samples, channels, height, width = acc.shape
        stride_n, stride_c, _, stride_w = acc.stride()  # either order: pixel p at p * stride_w
        out = torch.empty(acc.shape)
        ctx.has_bias = bias is not None
        bias = np.zeros(channels, dtype=np.float32) if bias is None else _flat(bias.float())
        cpu_codes.affine_output(
            acc.as_strided((acc.numel(),), (1,)).numpy(), stride_n, stride_c, stride_w,
            samples, height * width, noise is not None, *kernel_noise(noise),
            _flat(w_scale.float()), np.float32(step), bias, _flat(out),
        )  # fmt: skip
        if keep_input:  # checkpointing: keep only the input, quantize it again in backward
            ctx.save_for_backward(x, None, w_q, w_scale)
        else:  # the mask only where the input wants a gradient (a network's input does not)
            ctx.save_for_backward(codes, inside if ctx.needs_input_grad[0] else None, w_q, w_scale)
        ctx.step, ctx.qmax, ctx.conv, ctx.keep_input = step, qmax, conv, keep_input
        ctx.zero_point = zero_point
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        codes, inside, w_q, w_scale = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        x_q = torch.empty(codes.shape)
        step = np.float32(ctx.step)
        if ctx.keep_input:  # ``codes`` is the input: the same rounding as the forward's
            x, inside = codes, torch.empty(codes.shape, dtype=torch.uint8)
            cpu_pointwise.fake_quant_forward(
                _flat(x), np.float32(1.0) / step, step, np.float32(-ctx.qmax),
                np.float32(ctx.qmax), _flat(x_q), _flat(inside),
            )  # fmt: skip
        else:
            cpu_codes.dequantize_codes(_flat(codes), ctx.zero_point, step, _flat(x_q))
        w_scale = w_scale.view(-1, *([1] * (w_q.dim() - 1)))
        stride, padding, dilation, groups = ctx.conv
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.contiguous(), x_q, w_q * w_scale, [w_q.shape[0]] if ctx.has_bias else None,
            stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, need_b],
        )  # fmt: skip
        if need_x:  # the straight-through gradient of the input's quantization
            grad_x = masked_gradient(grad_x, inside)
        if need_w:  # w_q * w_scale's backward, as autograd computes it
            grad_w = grad_w * w_scale
        return grad_x, grad_w, None, grad_b if need_b else None, None, None, None, None, None


def quantized_conv2d(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    step: float,
    qmax: int,
    geometry: ConvGeometry,
    noise: NoiseSpec | None,
    keep_input: bool = False,
) -> torch.Tensor:
    """``conv2d(fake_quant(x, step, -qmax, qmax), w_q * w_scale) + bias`` with the sums computed
    exactly as integers, plus the error drawn at them (times ``step * w_scale``) if ``noise``.

    ``w_q`` holds integer values in [-qmax, qmax] (straight-through rounded weights, so its
    gradient reaches the float weights); ``w_scale`` is per output channel, without gradient.
    Only for inputs ``usable`` accepts; zero padding (given in ``geometry``). ``keep_input``
    (gradient checkpointing) keeps the float input for the backward instead of its 8-bit codes
    and mask: less memory where another op keeps that input anyway (a ReLU's output feeding the
    conv), more where none does; one more quantization pass in the backward.
    """
    return _QuantizedConv.apply(x, w_q, w_scale, bias, step, qmax, geometry, noise, keep_input)
