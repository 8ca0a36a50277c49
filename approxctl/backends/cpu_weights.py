"""numba kernels for analog's weight quantization chain (``approxctl.analog_weights``): the
per-channel scale, the 8-bit codes and the two straight-through weight signs in one pass, and
their gradient back to the float weight in one pass. Serial: a layer's weights are small (tens
of thousands of elements), where starting threads would cost more than the work.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.numba_cache import process_safe


@process_safe
@numba.njit(cache=True, nogil=True)
def split_forward(w, rows, a_step, scale, codes, pos, neg):  # type: ignore[no-untyped-def]
    """For ``w`` flat (rows, K): scale[o] = max(max|w[o]|, 1e-12) / 127, codes = rint(w /
    scale[o]) (ties to even; int8, in [-127, 127]), pos = max(codes / a_step, 0) and neg =
    max(-codes / a_step, 0) as torch's ``clamp(min=0)`` gives them (-0.0 kept), all in float32
    as the torch ops round, signed zeros included. Returns False, with the outputs unfinished,
    where ``w`` holds a NaN or an infinity."""
    k = w.shape[0] // rows
    tiny, top, zero = np.float32(1e-12), np.float32(127.0), np.float32(0.0)
    for o in range(rows):
        # unsigned offsets: signed ones get a wraparound check that stops the loops vectorizing
        first = np.uint64(o * k)
        largest, finite = zero, True
        for i in range(k):  # no early exit: it would stop this loop from vectorizing
            a = abs(w[first + np.uint64(i)])
            finite &= a < np.inf
            largest = max(largest, a)
        if not finite:  # NaN or infinity: the caller takes the torch ops
            return False
        s = max(largest, tiny) / top
        scale[o] = s
        for i in range(k):
            at = first + np.uint64(i)
            x = w[at] / s
            r = x + (np.rint(x) - x)  # as the straight-through rounding adds it: -0.0 -> 0.0
            codes[at] = np.int8(np.int32(r))
            v = r / a_step
            pos[at] = v if v >= zero else zero
            minus = -v
            neg[at] = minus if minus >= zero else zero
    return True


@process_safe
@numba.njit(cache=True, nogil=True)
def split_backward(grad_pos, grad_neg, codes, rows, a_step, scale, out):  # type: ignore[no-untyped-def]
    """out = (g+ where codes > 0, else 0) - (g- where codes < 0, else 0), over a_step, over
    scale[o]: what autograd computes through ``clamp(min=0)`` of +-codes / a_step (whose
    gradient torch 2.14 passes only where the input exceeds the bound: none at code 0), the
    straight-through rounding and the division by the scale, in the same order of float32
    operations (so bit for bit)."""
    k = codes.shape[0] // rows
    zero = np.float32(0.0)
    for o in range(rows):
        s = scale[o]
        first = np.uint64(o * k)
        for i in range(k):
            at = first + np.uint64(i)
            c = codes[at]
            a = grad_pos[at] if c > 0 else zero
            b = grad_neg[at] if c < 0 else zero
            out[at] = (a - b) / a_step / s
