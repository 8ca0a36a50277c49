"""numba kernels for analog's proxy on a convolution with few products per output (a first
layer), fused with its accumulations: ``approxctl.hardtanh_conv``.

Such a layer (TinyConv's first: one channel, 5x5, 4.2 M outputs at batch 128) is bound by
memory, not by multiply-adds, and its signed input makes the proxy four accumulations (SPEC 3.3):
through separate convolutions and the pointwise proxy kernels, each of the four output-sized
maps is written, read back, and written again as a gradient. Here one pass per output channel
and sample computes the four sums in cache and writes only the layer output (and a byte of
gradient masks), and the backward reads the output gradient once and returns the weight
gradients.

Layout: inputs are zero-padded planes with one spare row, so output position ``y * Wp + x`` of a
"wide" output ``Ho x Wp`` (``Wp`` the padded width, columns ``x >= Wo`` discarded) reads input
``y * Wp + x + offset(k)`` for every kernel position k: each k is one contiguous run that
vectorizes, at the price of computing the ``Wp - Wo`` discarded columns. Stride 1 only.

Both weight signs of one input fall on disjoint kernel positions (a weight is positive or
negative), so a sum over k takes one multiply-add per position and input sign, not two.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.cpu_pointwise import BLOCK, CHUNKS, _blocks, _write_output
from approxctl.backends.numba_cache import process_safe

TAPS = 4  # kernel positions per pass over the wide output: one load and store of the
# accumulator per TAPS multiply-adds where a pass per position spends one per multiply-add


@numba.njit(cache=True, nogil=True)
def taps(w, plane, wp, dy, dx):  # type: ignore[no-untyped-def]
    """Each output channel's kernel positions with positive (sign 0) and negative (sign 1)
    weights, in runs of TAPS: ``offset`` (O, 2, P) into the wide input of the channel's group,
    ``weight`` (O, 2, P) the magnitudes, ``index`` (O, 2, P) the flat position in w[o] (-1 for
    the zero-weight padding of a last run); ``runs`` (O, 2). Zero weights are in neither list:
    they add nothing, and w+ = max(w, 0), w- = max(-w, 0) pass them no gradient (torch's clamp
    gives none at the bound)."""
    channels, groups_in, kh, kw = w.shape
    size = groups_in * kh * kw
    width = (size + TAPS - 1) // TAPS * TAPS
    offset = np.zeros((channels, 2, width), dtype=np.int64)
    weight = np.zeros((channels, 2, width), dtype=np.float32)
    index = np.full((channels, 2, width), -1, dtype=np.int64)
    runs = np.zeros((channels, 2), dtype=np.int64)
    for o in range(channels):
        counts = [0, 0]
        for c in range(groups_in):
            for ky in range(kh):
                for kx in range(kw):
                    value = w[o, c, ky, kx]
                    if value == 0:
                        continue
                    sign = 0 if value > 0 else 1
                    at = counts[sign]
                    offset[o, sign, at] = c * plane + ky * dy * wp + kx * dx
                    weight[o, sign, at] = abs(value)
                    index[o, sign, at] = (c * kh + ky) * kw + kx
                    counts[sign] = at + 1
        for sign in range(2):
            runs[o, sign] = (counts[sign] + TAPS - 1) // TAPS
    return offset, weight, index, runs


@numba.njit(inline="always")
def _add_taps(x, first, offset, weight, run, z):  # type: ignore[no-untyped-def]
    """z += the TAPS positions of ``run`` of x (padded zero weights add zeros: x is finite)."""
    length = z.shape[0]
    base = run * TAPS
    o0, o1 = first + offset[base], first + offset[base + 1]
    o2, o3 = first + offset[base + 2], first + offset[base + 3]
    w0, w1, w2, w3 = weight[base], weight[base + 1], weight[base + 2], weight[base + 3]
    x0, x1 = x[o0 : o0 + length], x[o1 : o1 + length]
    x2, x3 = x[o2 : o2 + length], x[o3 : o3 + length]
    for j in range(length):
        z[j] += x0[j] * w0 + x1[j] * w1 + x2[j] * w2 + x3[j] * w3


@numba.njit(inline="always")
def _dot_taps(x, first, offset, run, g, out4):  # type: ignore[no-untyped-def]
    """out4[i] += dot(x at the i-th position of ``run``, g) over the wide output."""
    length = g.shape[0]
    base = run * TAPS
    o0, o1 = first + offset[base], first + offset[base + 1]
    o2, o3 = first + offset[base + 2], first + offset[base + 3]
    x0, x1 = x[o0 : o0 + length], x[o1 : o1 + length]
    x2, x3 = x[o2 : o2 + length], x[o3 : o3 + length]
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for j in range(length):
        t0 += x0[j] * g[j]
        t1 += x1[j] * g[j]
        t2 += x2[j] * g[j]
        t3 += x3[j] * g[j]
    out4[0] += t0
    out4[1] += t1
    out4[2] += t2
    out4[3] += t3


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def forward(  # type: ignore[no-untyped-def]
    pos, neg, four, w, channels_in, plane, wp, out_h, out_w, dy, dx, limit, scale, bias,
    noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
    out, inside,
):  # fmt: skip
    """``hardtanh_proxy_forward`` of the four accumulations of a stride-1 convolution, computed
    here: the same values, masks and drawn errors, bit for bit, where the sums are exact
    (integer operands whose sums stay below 2^24 in float32).

    ``pos``/``neg``: the flat padded input planes (N, C, Hp + 1, Wp) of the positive and the
    negative inputs (``neg`` is ignored unless ``four``), finite; ``w`` (O, C / groups, kh, kw)
    signed weights; ``plane`` = (Hp + 1) * Wp. ``out`` and ``inside`` are flat (N, O, Ho, Wo)."""
    channels = w.shape[0]
    groups_in = w.shape[1]
    per_group_out = channels // (channels_in // groups_in)
    inner = out_h * out_w
    segments = out.shape[0] // inner
    group, blocks = _blocks(segments, inner)
    chunks = min(blocks, CHUNKS)
    zero = np.float32(0.0)
    wide = out_h * wp
    offset, weight, _, runs = taps(w, plane, wp, dy, dx)
    for chunk in numba.prange(chunks):
        z0 = np.empty(wide, dtype=np.float32)
        z1 = np.empty(wide, dtype=np.float32)
        z2 = np.empty(wide, dtype=np.float32)
        z3 = np.empty(wide, dtype=np.float32)
        v = np.empty(max(BLOCK, inner), dtype=np.float32)
        code = np.empty(max(BLOCK, inner), dtype=np.uint8)
        t = np.empty(BLOCK, dtype=np.float32)
        err = np.empty(BLOCK, dtype=np.float32)
        hashes = np.empty(BLOCK // 2, dtype=np.uint32)
        for blk in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            seg = blk * group
            last = min(seg + group, segments)
            for s in range(seg, last):  # the block's segments' activations into v
                n, o = s // channels, s % channels
                first = (n * channels_in + (o // per_group_out) * groups_in) * plane
                z0[:] = zero
                z1[:] = zero
                for run in range(runs[o, 0]):
                    _add_taps(pos, first, offset[o, 0], weight[o, 0], run, z0)
                for run in range(runs[o, 1]):
                    _add_taps(pos, first, offset[o, 1], weight[o, 1], run, z1)
                if four:
                    z2[:] = zero
                    z3[:] = zero
                    for run in range(runs[o, 0]):
                        _add_taps(neg, first, offset[o, 0], weight[o, 0], run, z2)
                    for run in range(runs[o, 1]):
                        _add_taps(neg, first, offset[o, 1], weight[o, 1], run, z3)
                base = (s - seg) * inner
                for y in range(out_h):
                    a, b = z0[y * wp : y * wp + out_w], z1[y * wp : y * wp + out_w]
                    vs = v[base + y * out_w : base + (y + 1) * out_w]
                    cs = code[base + y * out_w : base + (y + 1) * out_w]
                    for i in range(out_w):
                        vs[i] = min(max(a[i], zero), limit) - min(max(b[i], zero), limit)
                        cs[i] = np.uint8(
                            (1 if zero <= a[i] <= limit else 0)
                            | (2 if zero <= b[i] <= limit else 0)
                        )
                    if four:
                        a, b = z2[y * wp : y * wp + out_w], z3[y * wp : y * wp + out_w]
                        for i in range(out_w):
                            vs[i] += min(max(b[i], zero), limit) - min(max(a[i], zero), limit)
                            cs[i] |= np.uint8(
                                (4 if zero <= a[i] <= limit else 0)
                                | (8 if zero <= b[i] <= limit else 0)
                            )
            end = last * inner
            for start in range(seg * inner, end, BLOCK):
                stop = min(end, start + BLOCK)
                m = stop - start
                at = start - seg * inner
                inside[start:stop] = code[at : at + m]
                _write_output(v[at : at + m], start, noise, key, mu_coef, sigma_coef, lo, hi,
                              bounds, table, shift, t, err, hashes, scale, bias, seg, inner,
                              out[start:stop])  # fmt: skip


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
def backward(  # type: ignore[no-untyped-def]
    grad, inside, scale, pos, neg, four, w, channels_in, plane, wp, out_h, out_w, dy, dx,
    grad_w, grad_sums,
):  # fmt: skip
    """d loss / d w through w+ = max(w, 0) and w- = max(-w, 0) into the four accumulations,
    from the output gradient ``grad`` and the forward's masks: what ``hardtanh_proxy_backward``,
    each accumulation's weight gradient and the two clamps' gradients give, up to float rounding
    (the sums run in another order).

    ``w``: the forward's weights, for their signs only; ``grad_w`` (O, w[0].size) zero-filled.
    ``pos``/``neg`` are laid out as in ``forward`` and may be any finite values (the backward
    wants the float operands, the forward their integer codes).
    ``grad_sums[segment]`` = the sum of ``grad`` over the segment (the bias gradient's terms).
    Per-chunk partial sums over samples are added in chunk order, so results do not depend on
    the number of threads."""
    channels = w.shape[0]
    groups_in = w.shape[1]
    per_group_out = channels // (channels_in // groups_in)
    inner = out_h * out_w
    samples = grad.shape[0] // (channels * inner)
    chunks = min(samples, CHUNKS)
    wide = out_h * wp
    zero = np.float32(0.0)
    offset, _, index, runs = taps(w, plane, wp, dy, dx)
    size = w[0].size
    partial = np.zeros((chunks, 2, channels, size), dtype=np.float32)
    for chunk in numba.prange(chunks):
        g0 = np.zeros(wide, dtype=np.float32)  # the discarded columns stay zero
        g1 = np.zeros(wide, dtype=np.float32)
        g2 = np.zeros(wide, dtype=np.float32)
        g3 = np.zeros(wide, dtype=np.float32)
        out4 = np.empty(TAPS, dtype=np.float32)
        for n in range(chunk * samples // chunks, (chunk + 1) * samples // chunks):
            for o in range(channels):
                s = n * channels + o
                s_c = scale[o]
                total = zero
                for y in range(out_h):
                    lo = s * inner + y * out_w
                    g, cd = grad[lo : lo + out_w], inside[lo : lo + out_w]
                    a, b = g0[y * wp : y * wp + out_w], g1[y * wp : y * wp + out_w]
                    for i in range(out_w):
                        total += g[i]
                        gs = g[i] * s_c
                        a[i] = gs if cd[i] & 1 else zero
                        b[i] = -gs if cd[i] & 2 else zero
                    if four:
                        a, b = g2[y * wp : y * wp + out_w], g3[y * wp : y * wp + out_w]
                        for i in range(out_w):
                            gs = g[i] * s_c
                            a[i] = -gs if cd[i] & 4 else zero
                            b[i] = gs if cd[i] & 8 else zero
                grad_sums[s] = total
                first = (n * channels_in + (o // per_group_out) * groups_in) * plane
                for sign in range(2):
                    for run in range(runs[o, sign]):
                        out4[:] = zero
                        _dot_taps(pos, first, offset[o, sign], run, g0 if sign == 0 else g1,
                                  out4)  # fmt: skip
                        if four:
                            _dot_taps(neg, first, offset[o, sign], run, g2 if sign == 0 else g3,
                                      out4)  # fmt: skip
                        for i in range(TAPS):
                            k = index[o, sign, run * TAPS + i]
                            if k >= 0:
                                partial[chunk, sign, o, k] += out4[i]
    for chunk in range(chunks):  # w > 0 takes d/dw+, w < 0 takes -d/dw-
        grad_w += partial[chunk, 0]
        grad_w -= partial[chunk, 1]
