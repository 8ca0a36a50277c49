"""numba kernels for a convolution's gradient from an output gradient with few nonzeros
(``approxctl.sign_pair``): find the nonzeros, then add each one's share of the input and the
weight gradient directly, where a dense ``convolution_backward`` would multiply by zeros.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.numba_cache import process_safe


@process_safe
@numba.njit(cache=True, nogil=True)
def nonzero_sums(a, b, limit, index):  # type: ignore[no-untyped-def]
    """The flat positions where ``a + b != 0`` (NaN counts as nonzero) into ``index``, in
    order; returns their number, or -1 as soon as there are more than ``limit``."""
    count = 0
    for i in range(a.shape[0]):
        if a[i] + b[i] != 0:
            if count == limit:
                return -1
            index[count] = i
            count += 1
    return count


@process_safe
@numba.njit(cache=True, nogil=True)
def conv_sparse_backward(  # type: ignore[no-untyped-def]
    values, index, out_shape, x, weight, stride, padding, dilation, groups, grad_x, grad_w
):
    """For each output-gradient entry ``values[j]`` at flat (N, O, OH, OW) position
    ``index[j]``, add its terms of ``convolution_backward``: ``grad_x`` (N, C, H, W) +=
    value * weight[o] over the output's window, ``grad_w`` (O, C / groups, kh, kw) +=
    value * x over the window. Either gradient may be an empty array (not wanted). Serial:
    entries of one sample or one channel add to the same places."""
    _, channels_out, out_h, out_w = out_shape
    per_group_in = weight.shape[1]
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    height, width = x.shape[2], x.shape[3]
    per_group_out = channels_out // groups
    want_x, want_w = grad_x.size > 0, grad_w.size > 0
    for j in range(index.shape[0]):
        flat = index[j]
        ow = flat % out_w
        oh = (flat // out_w) % out_h
        o = (flat // (out_w * out_h)) % channels_out
        n = flat // (out_w * out_h * channels_out)
        value = values[j]
        first_channel = (o // per_group_out) * per_group_in
        for c in range(per_group_in):
            for kh in range(kernel_h):
                ih = oh * stride[0] - padding[0] + kh * dilation[0]
                if ih < 0 or ih >= height:
                    continue
                for kw in range(kernel_w):
                    iw = ow * stride[1] - padding[1] + kw * dilation[1]
                    if iw < 0 or iw >= width:
                        continue
                    if want_x:
                        grad_x[n, first_channel + c, ih, iw] += value * weight[o, c, kh, kw]
                    if want_w:
                        grad_w[o, c, kh, kw] += value * x[n, first_channel + c, ih, iw]


def empty_like_none() -> np.ndarray:
    """The placeholder for a gradient that is not wanted (numba compiles one signature)."""
    return np.zeros((0, 0, 0, 0), dtype=np.float32)
