"""The weight gradient of a convolution with few products per output whose input wants no
gradient (a network's first layer), as a batched GEMM of the output gradient with the input's
patches.

oneDNN's weight gradient for such a convolution is slow on this project's CPUs: for TinyConv's
first layer (one input channel, 5x5, 32 outputs of 32x32, batch 128) it took 14-26 ms on the
2-core AMD EPYC (AVX2), against 8-11 ms as ``bmm(grad (N, O, P), patches (N, P, K))`` summed
over the batch, which is also the closer to float64's gradient (``benchmarks/patch_grad.py``).
The proxies of the targets use it for such layers (``ApproxConv2d.accumulate``; the sign pairs
of ``approxctl.sign_pair``); float mode keeps torch's convolution, which is what training
without approxctl runs. The forward is the plain convolution, so values are unchanged; the
gradient is the same sum in another order, equal up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from approxctl.integer_conv import MIN_REDUCTION, ConvGeometry


def serves(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry | None) -> bool:
    """Whether the weight gradient of ``conv2d(x, weight)`` should come from patches: a CPU
    float32 convolution without groups, fewer than ``MIN_REDUCTION`` products per output, an
    input that wants no gradient, outside autocast (whose convolution runs in bfloat16)."""
    return (
        geometry is not None and geometry.groups == 1 and weight.dim() == 4
        and weight[0].numel() < MIN_REDUCTION and not x.requires_grad
        and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )  # fmt: skip


def input_patches(x: torch.Tensor, kernel: tuple[int, ...], geometry: ConvGeometry) -> torch.Tensor:
    """The input's patches (N, P, K), K ordered (channel, kh, kw) like a weight's."""
    stride, padding, dilation, _ = geometry.args
    return F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)


def weight_grad(grad: torch.Tensor, patches: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The weight gradient (of ``shape``) from the output gradient (N, O, Ho, Wo) and
    ``input_patches``."""
    n, o = grad.shape[:2]
    return torch.bmm(grad.reshape(n, o, -1), patches).sum(0).view(shape)


class _PatchGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geometry):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        ctx.geometry, ctx.weight_shape = geometry, weight.shape
        return F.conv2d(x, weight, bias, *geometry.args)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            patches = input_patches(x, tuple(ctx.weight_shape[2:]), ctx.geometry)
            grad_w = weight_grad(grad, patches, ctx.weight_shape)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return None, grad_w, grad_b, None


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, *geometry.args)``, its weight gradient from patches where
    that ``serves``."""
    wanted = weight.requires_grad or (bias is not None and bias.requires_grad)
    if wanted and torch.is_grad_enabled() and serves(x, weight, geometry):
        return _PatchGradConv.apply(x, weight, bias, geometry)
    return F.conv2d(x, weight, bias, *geometry.args)
