"""numba kernels for sc's and analog's proxies on a convolution with few products per output
(a first layer), fused with its accumulations: ``approxctl.fused_conv``.

Such a layer (TinyConv's first: one channel, 5x5, 4.2 M outputs at batch 128) is bound by
memory, not by multiply-adds, and a signed input splits it into x+ and x-, each against w+ and
w- (SPEC 3.2, 3.3): through separate convolutions and the pointwise proxy kernels, every one of
those output-sized maps is written, read back, and written again as a gradient. Here one pass per
(sample, output channel) computes the four sums in cache and writes only what the proxy's
backward needs, and the backward reads the output gradient once and returns the weight
gradients.

The four sums: z0 = x+ . w+, z1 = x+ . w-, z2 = x- . w+, z3 = x- . w- (the last two only for a
signed input, ``four``). ``kind`` picks the proxy:
* ``ANALOG``: ``hardtanh_proxy_forward`` of (z0, z1, z2, z3): output and a byte of masks;
* ``SC``: ``sc_proxy_forward`` of z+ = (z0 + z3) * unit, z- = (z1 + z2) * unit (the streams
  [x+, x-] against [w+, w-] and [w-, w+]; the forward sums each stream in one accumulator):
  output and e+- = exp(-z+-).

Layout: inputs are zero-padded planes with one spare row, so output position ``y * Wp + x`` of a
"wide" output ``Ho x Wp`` (``Wp`` the padded width, columns ``x >= Wo`` discarded) reads input
``y * Wp + x + offset(k)`` for every kernel position k: each k is one contiguous run that
vectorizes, at the price of computing the ``Wp - Wo`` discarded columns. Stride 1 only.

w+ and w- fall on disjoint kernel positions (a weight is positive or negative), so a sum over k
takes one multiply-add per position and input sign, not two.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.cpu_pointwise import (
    BLOCK,
    CHUNKS,
    _blocks,
    _exp_neg,
    _write_output,
    hardtanh_activation,
    hardtanh_gradients,
    sc_gradients,
)
from approxctl.backends.numba_cache import process_safe

ANALOG = 0
SC = 1

TAPS = 4  # kernel positions per pass over the wide output: one load and store of the
# accumulator per TAPS multiply-adds where a pass per position spends one per multiply-add


@numba.njit(cache=True, nogil=True)
def taps(w, plane, wp, dy, dx):  # type: ignore[no-untyped-def]
    """Each output channel's kernel positions with positive (sign 0) and negative (sign 1)
    ``w``, in runs of TAPS: ``offset`` (O, 2, P) into the wide input of the channel's group,
    ``weight`` (O, 2, P) the magnitudes, ``index`` (O, 2, P) the flat position in w[o] (-1 for
    the zero-weight padding of a last run); ``runs`` (O, 2). Zero weights are in neither list."""
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
def _starts(first, offset, run):  # type: ignore[no-untyped-def]
    """Where the wide input runs of the TAPS positions of ``run`` start in x, as uint64
    offsets (not slices: see cpu_pointwise's module docstring). x is finite, so a padding
    position of weight zero adds zero."""
    base = run * TAPS
    return (
        np.uint64(first + offset[base]), np.uint64(first + offset[base + 1]),
        np.uint64(first + offset[base + 2]), np.uint64(first + offset[base + 3]),
    )  # fmt: skip


@numba.njit(inline="always")
def _add_taps(x, first, offset, weight, run, z):  # type: ignore[no-untyped-def]
    """z += the weighted TAPS positions of ``run`` of x."""
    o0, o1, o2, o3 = _starts(first, offset, run)
    base = run * TAPS
    w0, w1, w2, w3 = weight[base], weight[base + 1], weight[base + 2], weight[base + 3]
    for j in range(np.uint64(z.shape[0])):
        z[j] += x[o0 + j] * w0 + x[o1 + j] * w1 + x[o2 + j] * w2 + x[o3 + j] * w3


@numba.njit(inline="always")
def _set_taps(x, first, offset, weight, run, z):  # type: ignore[no-untyped-def]
    """z = the weighted TAPS positions of ``run`` of x (``_add_taps`` onto zeros, without
    their pass: the products are >= 0, so no -0.0 that 0.0 + p would turn into 0.0)."""
    o0, o1, o2, o3 = _starts(first, offset, run)
    base = run * TAPS
    w0, w1, w2, w3 = weight[base], weight[base + 1], weight[base + 2], weight[base + 3]
    for j in range(np.uint64(z.shape[0])):
        z[j] = x[o0 + j] * w0 + x[o1 + j] * w1 + x[o2 + j] * w2 + x[o3 + j] * w3


@numba.njit(inline="always")
def _sum_taps(x, first, offset, weight, runs, z, fresh):  # type: ignore[no-untyped-def]
    """z (+)= x's ``runs`` runs of positions (``fresh``: z = the sum, else z += it)."""
    if fresh:
        if runs == 0:
            z[:] = np.float32(0.0)
        else:
            _set_taps(x, first, offset, weight, 0, z)
    for run in range(1 if fresh and runs else 0, runs):
        _add_taps(x, first, offset, weight, run, z)


@numba.njit(inline="always")
def _add_signs(x, first, offset, weight, runs, z_pos, z_neg, fresh):  # type: ignore[no-untyped-def]
    """For one output channel: z_pos (+)= x's positions of positive weight, z_neg (+)= those
    of negative weight (``offset``, ``weight``, ``runs`` of ``taps`` for that channel;
    ``fresh``: the sums replace z_pos and z_neg)."""
    _sum_taps(x, first, offset[0], weight[0], runs[0], z_pos, fresh)
    _sum_taps(x, first, offset[1], weight[1], runs[1], z_neg, fresh)


@numba.njit(inline="always")
def _dot_taps(x, first, offset, run, g, out4):  # type: ignore[no-untyped-def]
    """out4[i] += dot(x at the i-th position of ``run``, g) over the wide output."""
    o0, o1, o2, o3 = _starts(first, offset, run)
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for j in range(np.uint64(g.shape[0])):
        t0 += x[o0 + j] * g[j]
        t1 += x[o1 + j] * g[j]
        t2 += x[o2 + j] * g[j]
        t3 += x[o3 + j] * g[j]
    out4[0] += t0
    out4[1] += t1
    out4[2] += t2
    out4[3] += t3


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def forward(  # type: ignore[no-untyped-def]
    kind, pos, neg, four, w, channels_in, plane, wp, out_h, out_w, dy, dx, limit, unit, scale,
    bias, noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
    out, inside, e_pos, e_neg,
):  # fmt: skip
    """The proxy's forward (``kind``) of the four accumulations of a stride-1 convolution,
    computed here: the same values, masks or e+-, and drawn errors, bit for bit, as the proxy
    kernel gives on exact sums (integer operands whose sums stay below 2^24 in float32).

    ``pos``/``neg``: the flat padded input planes (N, C, Hp + 1, Wp) of the positive and the
    negative inputs (``neg`` is ignored unless ``four``), finite; ``w`` (O, C / groups, kh, kw)
    the signed weights w+ - w-; ``plane`` = (Hp + 1) * Wp; ``limit``: analog's T; ``unit``:
    sc's factor from sums to z. ``out`` and ``inside`` (analog) or ``e_pos``/``e_neg`` (sc)
    are flat (N, O, Ho, Wo); the other kind's may be empty."""
    channels = w.shape[0]
    groups_in = w.shape[1]
    per_group_out = channels // (channels_in // groups_in)
    inner = out_h * out_w
    segments = out.shape[0] // inner
    group, blocks = _blocks(segments, inner)
    chunks = min(blocks, CHUNKS)
    wide = out_h * wp
    width = np.uint64(out_w)
    offset, weight, _, runs = taps(w, plane, wp, dy, dx)
    for chunk in numba.prange(chunks):
        z0 = np.empty(wide, dtype=np.float32)
        z1 = np.empty(wide, dtype=np.float32)
        z2 = np.empty(wide, dtype=np.float32)
        z3 = np.empty(wide, dtype=np.float32)
        v = np.empty(max(BLOCK, inner), dtype=np.float32)
        t = np.empty(BLOCK, dtype=np.float32)
        err = np.empty(BLOCK, dtype=np.float32)
        hashes = np.empty(BLOCK // 2, dtype=np.uint32)
        for blk in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            seg = blk * group
            last = min(seg + group, segments)
            for s in range(seg, last):  # the block's segments' activations into v
                n, o = s // channels, s % channels
                first = (n * channels_in + (o // per_group_out) * groups_in) * plane
                _add_signs(pos, first, offset[o], weight[o], runs[o], z0, z1, True)
                if four:  # x-'s sums: analog keeps them apart; sc adds z2 to z1, z3 to z0
                    with_pos, with_neg = (z1, z0) if kind == SC else (z2, z3)
                    _add_signs(neg, first, offset[o], weight[o], runs[o], with_pos, with_neg,
                               kind != SC)  # fmt: skip
                base = (s - seg) * inner
                for y in range(out_h):  # offsets, not slices: see cpu_pointwise
                    row = np.uint64(y * wp)
                    v_at = np.uint64(base + y * out_w)
                    at = np.uint64(s * inner + y * out_w)
                    if kind == ANALOG:
                        hardtanh_activation(z0, z1, z2, z3, row, four, limit, v, v_at, inside,
                                            at, width)  # fmt: skip
                    else:
                        _sc_row(z0, z1, row, unit, v, v_at, e_pos, e_neg, at, width)
            end = last * inner
            for start in range(seg * inner, end, BLOCK):
                _write_output(v, start - seg * inner, min(end, start + BLOCK) - start, start,
                              noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, t,
                              err, hashes, scale, bias, seg, inner, out)  # fmt: skip


@numba.njit(inline="always")
def _sc_row(z_pos, z_neg, at, unit, v, v_at, e_pos, e_neg, e_at, m):  # type: ignore[no-untyped-def]
    """One output row of ``sc_proxy_forward``'s activation and e+- (same arithmetic) from the
    streams' exact sums: the ``m`` sums from ``at`` into v from ``v_at`` and e+- from ``e_at``
    (offsets and m uint64, as in cpu_pointwise's row helpers)."""
    for i in range(m):
        a = _exp_neg(z_pos[at + i] * unit)
        b = _exp_neg(z_neg[at + i] * unit)
        e_pos[e_at + i] = a
        e_neg[e_at + i] = b
        v[v_at + i] = b - a


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
def backward(  # type: ignore[no-untyped-def]
    kind, grad, inside, e_pos, e_neg, scale, pos, neg, four, w, channels_in, plane, wp, out_h,
    out_w, dy, dx, grad_w, grad_sums,
):  # fmt: skip
    """The gradients of the weights w+ and w- of the four accumulations, from the output
    gradient ``grad`` and what the forward kept (analog: ``inside``; sc: ``e_pos``, ``e_neg``):
    what the proxy kernel's backward followed by each accumulation's weight gradient gives, up
    to float rounding (the sums run in another order).

    ``w``: signs only: ``grad_w[0]`` (d/dw+) is computed where w > 0, ``grad_w[1]`` (d/dw-)
    where w < 0, zeros elsewhere (the caller's chain must pass no gradient there).
    ``grad_w`` (2, O, w[0].size) comes zero-filled. ``pos``/``neg`` are laid out as in
    ``forward`` and may be any finite values (the backward wants the float operands, the
    forward their integer codes). ``grad_sums[segment]`` = the sum of ``grad`` over the segment
    (the bias gradient's terms). Per-chunk partial sums over samples are added in chunk order,
    so results do not depend on the number of threads."""
    channels = w.shape[0]
    groups_in = w.shape[1]
    per_group_out = channels // (channels_in // groups_in)
    inner = out_h * out_w
    samples = grad.shape[0] // (channels * inner)
    chunks = min(samples, CHUNKS)
    wide = out_h * wp
    width = np.uint64(out_w)
    zero = np.float32(0.0)
    offset, _, index, runs = taps(w, plane, wp, dy, dx)
    partial = np.zeros((chunks, 2, channels, grad_w.shape[2]), dtype=np.float32)
    for chunk in numba.prange(chunks):
        # d/dz of z0..z3 over the wide output; the discarded columns stay zero
        g0 = np.zeros(wide, dtype=np.float32)
        g1 = np.zeros(wide, dtype=np.float32)
        g2 = np.zeros(wide, dtype=np.float32)
        g3 = np.zeros(wide, dtype=np.float32)
        out4 = np.empty(TAPS, dtype=np.float32)
        for n in range(chunk * samples // chunks, (chunk + 1) * samples // chunks):
            for o in range(channels):
                s = n * channels + o
                s_c = scale[o]
                total = zero
                for y in range(out_h):  # offsets, not slices: see cpu_pointwise
                    at = np.uint64(s * inner + y * out_w)
                    row = np.uint64(y * wp)
                    if kind == ANALOG:  # hardtanh_proxy_backward's arithmetic
                        total += hardtanh_gradients(grad, inside, at, s_c, four, g0, g1, g2, g3,
                                                    row, width)  # fmt: skip
                    else:  # sc_proxy_backward's: z0 and z3 make z+, z1 and z2 make z-
                        total += sc_gradients(grad, e_pos, e_neg, at, s_c, g0, g1, row, width)
                        if four:
                            for i in range(width):
                                g2[row + i] = g1[row + i]
                                g3[row + i] = g0[row + i]
                grad_sums[s] = total
                first = (n * channels_in + (o // per_group_out) * groups_in) * plane
                for sign in range(2):  # w+ meets z0 (x+) and z2 (x-), w- meets z1 and z3
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
    for chunk in range(chunks):
        grad_w += partial[chunk]
