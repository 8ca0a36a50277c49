"""numba kernels for the pointwise work of ``exact`` and ``inject`` mode on CPU.

A proxy activation composed of torch ops costs one pass over the layer output per op (negate,
exponentiate, subtract, scale, add bias, draw the error, add it; then as many again for the
gradients), and most of those passes allocate. These kernels do the forward in one pass and the
backward in one pass, which is what makes error injection cheap (paper section 3.2) on a CPU whose
float step is itself only a few convolutions.

Every kernel walks a contiguous output as channel-major segments: ``inner`` elements per (sample,
channel), channel ``c = segment mod channels``, with one output scale and bias per channel. Work is
split into blocks of at most ``BLOCK`` elements, so loops over a block vectorize: pieces of one
segment, or runs of whole segments shorter than ``GROUP_BELOW`` (a linear layer's segments are
one element each; a block per segment would spend its time in set-up). Segments shorter than
``SHORT`` are written in one flat loop per block.

The helpers that a kernel calls per row or per segment (``hardtanh_activation``,
``hardtanh_gradients``, ``sc_gradients``, ``_write_output``) take whole arrays and uint64
offsets, so a caller walking short runs makes no slices: in numba each slice costs two atomic
reference-count updates, which over a row of 32 elements (the fused first layer's) cost more
than the row's arithmetic. The offsets are unsigned because numba indexes a signed ``offset +
i`` with a negative-index wraparound check that stops the loop from vectorizing. Where segments
are long (the backward kernels' loops below), callers pass slices and offset 0: there the
slices' cost is spread thin and the loops over them measured faster (docs/design.md, "Fused
proxy kernels", has the measurements).

The injected error (SPEC section 4) at accumulator value v is ``mu(t) + sigma(t) * eps``,
t = clamp(v, lo, hi) mapped onto [-1, 1], mu and sigma polynomials (lowest order first; degree 0
for the type-2 Gaussian model) held within the bounds of the statistics they were fitted to.
eps is an inverse-CDF sample: a 32-bit counter hash of the element's index and a seed picks one
of the equiprobable quantiles of N(0, 1) in ``table``, so the draw is reproducible and does not
depend on the number of threads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from approxctl.backends.numba_cache import process_safe

BLOCK = 2048
SHORT = 16  # segments shorter than this are written in one flat loop per block
FUSED_FROM = 256  # shorter segments compute the error in a pass of its own (per-segment
# loops that short spend more on setting up the polynomials than they save)
GROUP_BELOW = 64  # shorter segments share blocks; longer ones (conv maps of 8x8 and up) do not
CHUNKS = 64  # parallel tasks per kernel call (the scratch of each is allocated once)
_MASK32 = np.uint64(0xFFFFFFFF)


@numba.njit(inline="always")
def _lowbias32(x: np.uint32) -> np.uint32:
    """Chris Wellons' lowbias32 integer hash. numba widens 32-bit arithmetic to 64 bits, so
    every step is truncated back; in 32-bit lanes the loop then vectorizes 8 wide."""
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ (x >> np.uint32(16)))


@numba.njit(inline="always")
def _horner(coef, x):  # type: ignore[no-untyped-def]
    """sum_j coef[j] x^j by Horner's rule. ``coef`` is a tuple, so its length is a compile-time
    constant: the loop unrolls, and the loop around a call vectorizes."""
    acc = coef[len(coef) - 1]
    for j in range(len(coef) - 2, -1, -1):
        acc = acc * x + coef[j]
    return acc


@numba.njit(inline="always")
def _draw_eps(start, m, key, table, shift, t, hashes):  # type: ignore[no-untyped-def]
    """``t[i]`` = the standard normal sample of element ``start + i`` of the output, i < m.

    ``hashes`` (uint32, at least (m + 1) // 2) is scratch. One hash of ``start + i`` serves
    elements i (its low bits) and (m + 1) // 2 + i (its high bits) of the block; the hash
    inputs of a block lie inside its own index range, so no two blocks share one. (Loops index
    slices from 0: numba cannot prove ``start + i`` non-negative, and the wraparound check it
    adds to such accesses stops loops from vectorizing.)

    The table lookups have loops of their own: a loop with an indexed load does not vectorize
    (the table may alias the output), and the hashes' loop and the callers' loops do.
    """
    # The index's high half (0 below 2^32 elements) goes into the salt, once per block.
    high = (np.uint64(start) >> np.uint64(32)) * np.uint64(0x85EBCA6B)
    salt = np.uint32((key ^ high) & _MASK32)
    low = np.uint32(np.uint64(start) & _MASK32)
    half = (m + 1) // 2
    for i in range(half):
        hashes[i] = _lowbias32(np.uint32(salt ^ np.uint32(low + np.uint32(i))))
    low_bits = np.uint32(table.shape[0] - 1)  # the table has 2^(32 - shift) entries
    for i in range(half):
        t[i] = table[hashes[i] & low_bits]
    for i in range(m - half):
        t[half + i] = table[hashes[i] >> np.uint32(shift)]


@numba.njit(inline="always")
def _error_at(v, eps, mu_coef, sigma_coef, lo, hi, bounds):  # type: ignore[no-untyped-def]
    """The error drawn at accumulator value ``v`` with the normal sample ``eps``:
    ``mu + sigma * eps``. ``mu_coef``/``sigma_coef`` are tuples of float32 (lowest order
    first); ``bounds`` = (mu_min, mu_max, sigma_max): the polynomials are held inside the range
    of the statistics they were fitted to. Inlined into the callers' loops, so the error is
    computed where it is used, with no pass over scratch memory of its own."""
    mid = np.float32(0.5) * (lo + hi)
    inv_half = np.float32(2.0) / (hi - lo)
    x = (min(max(v, lo), hi) - mid) * inv_half
    mu = min(max(_horner(mu_coef, x), bounds[0]), bounds[1])
    sigma = min(max(_horner(sigma_coef, x), np.float32(0.0)), bounds[2])
    return mu + sigma * eps


@numba.njit(inline="always")
def _draw_error(  # type: ignore[no-untyped-def]
    v, v_at, m, start, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, t, err, hashes
):
    """``err[i]`` = the error drawn at accumulator value v[v_at + i] for element ``start + i``
    of the output, i < m (``t`` is scratch: it holds eps): for the flat loops of short
    segments, where the error cannot be computed inside a per-segment loop."""
    _draw_eps(start, m, key, table, shift, t, hashes)
    at = np.uint64(v_at)
    for i in range(np.uint64(m)):
        err[i] = _error_at(v[at + i], t[i], mu_coef, sigma_coef, lo, hi, bounds)


@numba.njit(inline="always")
def _blocks(segments, inner):  # type: ignore[no-untyped-def]
    """How the kernels cut the output into blocks: ``(group, blocks)``. A block is a run of
    ``group`` whole segments when segments are short (a linear layer's hold one element each,
    and per-block set-up would otherwise dominate), else one segment, itself walked in pieces of
    at most BLOCK elements (grouping longer segments measured no faster). Every kernel cuts the
    same way, so they draw the same errors."""
    group = max(1, BLOCK // inner) if inner < GROUP_BELOW else 1
    return group, (segments + group - 1) // group


@numba.njit(inline="always")
def _write_output(  # type: ignore[no-untyped-def]
    v, v_at, m, start, noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, t, err,
    hashes, scale, bias, seg, inner, out,
):
    """out[start + i] = (v[v_at + i] + error drawn at it) * scale[c] + bias[c] for the ``m``
    elements of one block (no error unless ``noise``), the block starting in segment ``seg``:
    the common tail of the fused proxy kernels. Indexed by offsets, not slices (see the module
    docstring)."""
    channels = scale.shape[0]
    length = min(inner, m)  # a piece of one segment, or whole segments
    c = seg % channels
    if length < SHORT:  # per-segment loops would cost more than the work: one flat loop
        if noise:
            _draw_error(v, v_at, m, start, key, mu_coef, sigma_coef, lo, hi, bounds, table,
                        shift, t, err, hashes)  # fmt: skip
        at, to = np.uint64(v_at), np.uint64(start)
        j = 0
        for i in range(np.uint64(m)):
            e = err[i] if noise else np.float32(0.0)
            out[to + i] = (v[at + i] + e) * scale[c] + bias[c]
            j += 1
            if j == length:
                j = 0
                c = c + 1 if c + 1 < channels else 0
        return
    fused = length >= FUSED_FROM
    if noise and fused:
        _draw_eps(start, m, key, table, shift, t, hashes)
    elif noise:
        _draw_error(v, v_at, m, start, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
                    t, err, hashes)  # fmt: skip
    run = np.uint64(length)
    for first in range(0, m, length):
        s_c, b_c = scale[c], bias[c]
        f, at, to = np.uint64(first), np.uint64(v_at + first), np.uint64(start + first)
        if noise and fused:
            for i in range(run):
                e = _error_at(v[at + i], t[f + i], mu_coef, sigma_coef, lo, hi, bounds)
                out[to + i] = (v[at + i] + e) * s_c + b_c
        elif noise:
            for i in range(run):
                out[to + i] = (v[at + i] + err[f + i]) * s_c + b_c
        else:
            for i in range(run):
                out[to + i] = v[at + i] * s_c + b_c
        c = c + 1 if c + 1 < channels else 0


@numba.njit(inline="always")
def _add_noise_short(  # type: ignore[no-untyped-def]
    y, start, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, scale, bias, seg, length,
    v, t, err, hashes, out,
):
    """add_noise's block of whole segments shorter than SHORT, in flat loops (the channel
    advances every ``length`` elements); the same arithmetic as the per-segment loops."""
    m = v.shape[0]
    channels = scale.shape[0]
    c, j = seg % channels, 0
    for i in range(m):
        v[i] = (y[start + i] - bias[c]) * (np.float32(1.0) / scale[c])
        j += 1
        if j == length:
            j = 0
            c = c + 1 if c + 1 < channels else 0
    _draw_error(v, 0, m, start, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, t,
                err, hashes)  # fmt: skip
    c, j = seg % channels, 0
    for i in range(m):
        out[start + i] = y[start + i] + err[i] * scale[c]
        j += 1
        if j == length:
            j = 0
            c = c + 1 if c + 1 < channels else 0


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def add_noise(y, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift, scale, bias, inner, out):  # type: ignore[no-untyped-def]
    """out = y + error(v) * scale[c], v = (y - bias[c]) / scale[c]. ``out`` may be ``y``."""
    n = y.shape[0]
    channels = scale.shape[0]
    group, blocks = _blocks(n // inner, inner)
    # Few chunks, each allocating its scratch once: an allocation per block costs more than a
    # small block's work. Chunking does not change results.
    chunks = min(blocks, CHUNKS)
    for chunk in numba.prange(chunks):
        v = np.empty(BLOCK, dtype=np.float32)
        t = np.empty(BLOCK, dtype=np.float32)
        err = np.empty(BLOCK, dtype=np.float32)
        hashes = np.empty(BLOCK // 2, dtype=np.uint32)
        for blk in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            seg = blk * group
            end = min(seg + group, n // inner) * inner
            for start in range(seg * inner, end, BLOCK):
                m = min(end, start + BLOCK) - start
                length = min(inner, m)
                if length < SHORT:  # per-segment slices would cost more than the work
                    _add_noise_short(y, start, key, mu_coef, sigma_coef, lo, hi, bounds, table,
                                     shift, scale, bias, seg, length, v[:m], t, err, hashes,
                                     out)  # fmt: skip
                    continue
                c = seg % channels
                if length >= FUSED_FROM:  # v and the error in one pass; t: eps, then error
                    _draw_eps(start, m, key, table, shift, t, hashes)
                    for first in range(0, m, length):
                        b_c, inv_s = bias[c], np.float32(1.0) / scale[c]
                        ys = y[start + first : start + first + length]
                        ts = t[first : first + length]
                        for i in range(length):
                            v_i = (ys[i] - b_c) * inv_s
                            ts[i] = _error_at(v_i, ts[i], mu_coef, sigma_coef, lo, hi, bounds)
                        c = c + 1 if c + 1 < channels else 0
                    errors = t
                else:
                    for first in range(0, m, length):
                        b_c, inv_s = bias[c], np.float32(1.0) / scale[c]
                        ys = y[start + first : start + first + length]
                        vs = v[first : first + length]
                        for i in range(length):
                            vs[i] = (ys[i] - b_c) * inv_s
                        c = c + 1 if c + 1 < channels else 0
                    _draw_error(v, 0, m, start, key, mu_coef, sigma_coef, lo, hi, bounds,
                                table, shift, t, err, hashes)  # fmt: skip
                    errors = err
                # A loop of its own: ``out`` may be ``y``, and where LLVM's run-time check finds
                # two arrays overlapping it runs a loop's scalar version: cheap for this loop,
                # about 7x slower for the polynomials' (measured).
                c = seg % channels
                for first in range(0, m, length):
                    s_c = scale[c]
                    lo_, hi_ = start + first, start + first + length
                    ys, os_ = y[lo_:hi_], out[lo_:hi_]
                    es = errors[first : first + length]
                    for i in range(length):
                        os_[i] = ys[i] + es[i] * s_c
                    c = c + 1 if c + 1 < channels else 0


@intrinsic
def _float_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits`` (a free,
    vectorizable bitcast; numba widens int32 arithmetic to int64, hence the truncation)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        value = args[0]
        if bits.bitwidth != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@numba.njit(inline="always")
def _exp_neg(z: np.float32) -> np.float32:
    """exp(-z) in float32 for z >= 0 (negative z is taken as 0), vectorizable.

    exp(-z) = 2^-k e^-r with k = round(z log2 e) and r = z - k ln 2 in [-ln2/2, ln2/2] (ln 2 split
    in two parts, Cody-Waite), e^-r by its degree-7 Taylor polynomial (relative error < 3e-8),
    2^-k from its exponent bits. z > 87 gives about 1.6e-38 or less (true value < 1.7e-38).
    """
    z = min(max(z, np.float32(0.0)), np.float32(87.0))
    k = np.floor(z * np.float32(1.44269504) + np.float32(0.5))
    r = (z - k * np.float32(0.693359375)) + k * np.float32(2.12194440e-4)
    p = np.float32(-1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r - np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r - np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r - np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _float_from_bits((np.int32(127) - np.int32(k)) << np.int32(23))


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def sc_proxy_forward(  # type: ignore[no-untyped-def]
    z_pos, z_neg, scale, bias, inner,
    noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
    out, e_pos, e_neg,
):  # fmt: skip
    """SC_act (SPEC 3.2) with its output affine map, and the injected error when ``noise``.

    e± = exp(-z±) (kept for the backward); v = e- - e+ = (1 - e+) - (1 - e-);
    out = (v + error(v)) * scale[c] + bias[c]. ``e_pos``/``e_neg`` may be ``z_pos``/``z_neg``.
    """
    n = z_pos.shape[0]
    group, blocks = _blocks(n // inner, inner)
    # Few chunks, each allocating its scratch once: an allocation per block costs more than a
    # small block's work. Chunking does not change results.
    chunks = min(blocks, CHUNKS)
    for chunk in numba.prange(chunks):
        v = np.empty(BLOCK, dtype=np.float32)
        t = np.empty(BLOCK, dtype=np.float32)
        err = np.empty(BLOCK, dtype=np.float32)
        hashes = np.empty(BLOCK // 2, dtype=np.uint32)
        for blk in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            seg = blk * group
            end = min(seg + group, n // inner) * inner
            for start in range(seg * inner, end, BLOCK):
                stop = min(end, start + BLOCK)
                m = stop - start
                at = np.uint64(start)
                for i in range(np.uint64(m)):
                    a = _exp_neg(z_pos[at + i])
                    b = _exp_neg(z_neg[at + i])
                    e_pos[at + i] = a
                    e_neg[at + i] = b
                    v[i] = b - a
                _write_output(v, 0, m, start, noise, key, mu_coef, sigma_coef, lo, hi, bounds,
                              table, shift, t, err, hashes, scale, bias, seg, inner,
                              out)  # fmt: skip


@numba.njit(inline="always")
def _step_segment(j, seg, c, total, inner, channels, grad_sums):  # type: ignore[no-untyped-def]
    """The flat backward loops' bookkeeping after an element: at a segment's end, store its
    gradient sum and move on to the next segment and its channel. Returns (j, seg, c, total)."""
    j += 1
    if j < inner:
        return j, seg, c, total
    grad_sums[seg] = total
    return 0, seg + 1, (c + 1 if c + 1 < channels else 0), np.float32(0.0)


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
def sc_proxy_backward(grad, e_pos, e_neg, scale, inner, grad_pos, grad_neg, grad_sums):  # type: ignore[no-untyped-def]
    """d/dz+ = grad * scale * e+, d/dz- = -grad * scale * e-; ``grad_sums[segment]`` = the sum of
    ``grad`` over the segment (for the bias gradient). Blocks are cut as in the forward
    kernels; segments shorter than SHORT go through one flat loop per block."""
    channels = scale.shape[0]
    segments = grad.shape[0] // inner
    group, blocks = _blocks(segments, inner)
    for blk in numba.prange(blocks):
        first, last = blk * group, min(blk * group + group, segments)
        if inner < SHORT:  # a linear layer's one-element segments: no per-segment loops
            lo, hi = first * inner, last * inner
            g, ep, en = grad[lo:hi], e_pos[lo:hi], e_neg[lo:hi]
            gp, gn = grad_pos[lo:hi], grad_neg[lo:hi]
            c, j, seg, total = first % channels, 0, first, np.float32(0.0)
            s_c = scale[c]
            for i in range(hi - lo):
                total += g[i]
                gs = g[i] * s_c
                gp[i] = gs * ep[i]
                gn[i] = -gs * en[i]
                j, seg, c, total = _step_segment(j, seg, c, total, inner, channels, grad_sums)
                s_c = scale[c]
            continue
        zero_at, length = np.uint64(0), np.uint64(inner)
        for seg in range(first, last):  # slices, offset 0: see the module docstring
            lo, hi = seg * inner, seg * inner + inner
            grad_sums[seg] = sc_gradients(
                grad[lo:hi], e_pos[lo:hi], e_neg[lo:hi], zero_at, scale[seg % channels],
                grad_pos[lo:hi], grad_neg[lo:hi], zero_at, length,
            )  # fmt: skip


@numba.njit(inline="always")
def hardtanh_activation(z0, z1, z2, z3, at, four, limit, v, v_at, code, code_at, m):  # type: ignore[no-untyped-def]
    """Analog_act of the ``m`` elements of the z's from ``at``, into v and code from ``v_at``
    and ``code_at`` (offsets and m uint64):
    v = clamp(z0, 0, T) - clamp(z1, 0, T) [- clamp(z2, 0, T) + clamp(z3, 0, T) with ``four``],
    ``code`` bit j set where 0 <= z_j <= T. Shared by every kernel that computes it, so they
    agree bit for bit."""
    zero = np.float32(0.0)
    for i in range(m):
        a, b = z0[at + i], z1[at + i]
        v[v_at + i] = min(max(a, zero), limit) - min(max(b, zero), limit)
        code[code_at + i] = np.uint8(
            (1 if zero <= a <= limit else 0) | (2 if zero <= b <= limit else 0)
        )
    if four:
        for i in range(m):
            a, b = z2[at + i], z3[at + i]
            v[v_at + i] += min(max(b, zero), limit) - min(max(a, zero), limit)
            code[code_at + i] |= np.uint8(
                (4 if zero <= a <= limit else 0) | (8 if zero <= b <= limit else 0)
            )


@numba.njit(inline="always")
def hardtanh_gradients(g, code, at, s_c, four, g0, g1, g2, g3, g_at, m):  # type: ignore[no-untyped-def]
    """d/dz_j = +-g * s_c where bit j of ``code`` is set (the forward's signs), else 0, for the
    ``m`` elements of g and code from ``at``, into the g_j from ``g_at`` (offsets and m
    uint64; g2, g3 only with ``four``); returns the sum of those g."""
    zero = np.float32(0.0)
    total = zero
    for i in range(m):
        total += g[at + i]
        gs = g[at + i] * s_c
        g0[g_at + i] = gs if code[at + i] & 1 else zero
        g1[g_at + i] = -gs if code[at + i] & 2 else zero
    if four:
        for i in range(m):
            gs = g[at + i] * s_c
            g2[g_at + i] = -gs if code[at + i] & 4 else zero
            g3[g_at + i] = gs if code[at + i] & 8 else zero
    return total


@numba.njit(inline="always")
def sc_gradients(g, e_pos, e_neg, at, s_c, g_pos, g_neg, g_at, m):  # type: ignore[no-untyped-def]
    """d/dz+ = g * s_c * e+, d/dz- = -g * s_c * e- for the ``m`` elements of g and e+- from
    ``at``, into g_pos and g_neg from ``g_at`` (offsets and m uint64); returns the sum of
    those g."""
    total = np.float32(0.0)
    for i in range(m):
        total += g[at + i]
        gs = g[at + i] * s_c
        g_pos[g_at + i] = gs * e_pos[at + i]
        g_neg[g_at + i] = -gs * e_neg[at + i]
    return total


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def hardtanh_proxy_forward(  # type: ignore[no-untyped-def]
    z0, z1, z2, z3, four, limit, scale, bias, inner,
    noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
    out, inside,
):  # fmt: skip
    """Analog_act (SPEC 3.3) with its output affine map, and the injected error when ``noise``.

    z0, z1: the accumulations [z+, z-] of the positive inputs; with ``four``, z2, z3: those of
    the negative inputs, whose activation is subtracted:
    v = clamp(z0, 0, T) - clamp(z1, 0, T) [- clamp(z2, 0, T) + clamp(z3, 0, T)].
    ``inside`` (uint8) gets bit j set where 0 <= z_j <= T (the gradient mask);
    out = (v + error(v)) * scale[c] + bias[c].
    """
    n = z0.shape[0]
    group, blocks = _blocks(n // inner, inner)
    # Few chunks, each allocating its scratch once: an allocation per block costs more than a
    # small block's work. Chunking does not change results.
    chunks = min(blocks, CHUNKS)
    for chunk in numba.prange(chunks):
        v = np.empty(BLOCK, dtype=np.float32)
        t = np.empty(BLOCK, dtype=np.float32)
        err = np.empty(BLOCK, dtype=np.float32)
        hashes = np.empty(BLOCK // 2, dtype=np.uint32)
        for blk in range(chunk * blocks // chunks, (chunk + 1) * blocks // chunks):
            seg = blk * group
            end = min(seg + group, n // inner) * inner
            for start in range(seg * inner, end, BLOCK):
                stop = min(end, start + BLOCK)
                m = stop - start
                at = np.uint64(start)
                hardtanh_activation(z0, z1, z2, z3, at, four, limit, v, np.uint64(0), inside,
                                    at, np.uint64(m))  # fmt: skip
                _write_output(v, 0, m, start, noise, key, mu_coef, sigma_coef, lo, hi, bounds,
                              table, shift, t, err, hashes, scale, bias, seg, inner,
                              out)  # fmt: skip


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})
def hardtanh_proxy_backward(  # type: ignore[no-untyped-def]
    grad, inside, scale, inner, g0, g1, g2, g3, four, grad_sums, nonzeros
):
    """g_j = +-grad * scale where bit j of ``inside`` is set (the signs of the forward), else 0
    (g2, g3 only with ``four``); ``grad_sums[segment]`` = the sum of ``grad`` over the segment.
    ``nonzeros`` (int64, 2) gets the number of elements where g0 + g1 != 0, and where g2 + g3
    != 0 (NaN counts): what ``approxctl.sign_pair``'s scan of each pair would find, counted
    here while the values are in cache. Blocks are cut as in the forward kernels; segments
    shorter than SHORT go through one flat loop per block."""
    channels = scale.shape[0]
    segments = grad.shape[0] // inner
    group, blocks = _blocks(segments, inner)
    zero = np.float32(0.0)
    counts = np.zeros((blocks, 2), dtype=np.int64)
    for blk in numba.prange(blocks):
        first, last = blk * group, min(blk * group + group, segments)
        if inner < SHORT:  # a linear layer's one-element segments: no per-segment loops
            lo, hi = first * inner, last * inner
            g, code = grad[lo:hi], inside[lo:hi]
            a, b, c2, c3 = g0[lo:hi], g1[lo:hi], g2[lo:hi], g3[lo:hi]
            c, j, seg, total = first % channels, 0, first, zero
            s_c = scale[c]
            for i in range(hi - lo):
                total += g[i]
                gs = g[i] * s_c
                a[i] = gs if code[i] & 1 else zero
                b[i] = -gs if code[i] & 2 else zero
                if four:
                    c2[i] = -gs if code[i] & 4 else zero
                    c3[i] = gs if code[i] & 8 else zero
                j, seg, c, total = _step_segment(j, seg, c, total, inner, channels, grad_sums)
                s_c = scale[c]
            counts[blk, 0] = _nonzero_sums(a, b, np.uint64(hi - lo))
            if four:
                counts[blk, 1] = _nonzero_sums(c2, c3, np.uint64(hi - lo))
            continue
        zero_at, length = np.uint64(0), np.uint64(inner)
        for seg in range(first, last):  # slices, offset 0: see the module docstring
            lo, hi = seg * inner, seg * inner + inner
            a, b = g0[lo:hi], g1[lo:hi]
            grad_sums[seg] = hardtanh_gradients(
                grad[lo:hi], inside[lo:hi], zero_at, scale[seg % channels], four, a, b,
                g2[lo:hi], g3[lo:hi], zero_at, length,
            )  # fmt: skip
            counts[blk, 0] += _nonzero_sums(a, b, length)
            if four:
                counts[blk, 1] += _nonzero_sums(g2[lo:hi], g3[lo:hi], length)
    nonzeros[0] = counts[:, 0].sum()
    nonzeros[1] = counts[:, 1].sum()


@numba.njit(inline="always")
def _nonzero_sums(a, b, m):  # type: ignore[no-untyped-def]
    """How many of the first ``m`` (uint64) elements have a + b != 0 (NaN counts)."""
    count = 0
    for i in range(m):
        count += 1 if a[i] + b[i] != 0 else 0
    return count


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def fake_quant_forward(x, inv_step, step, qmin, qmax, out, inside):  # type: ignore[no-untyped-def]
    """out = clamp(rint(x * inv_step), qmin, qmax) * step, as torch.fake_quantize_per_tensor_affine
    computes it (float32, round half to even, zero point 0; NaN stays NaN); ``inside`` = 1 where
    the rounded value lies in [qmin, qmax] (where the straight-through gradient passes)."""
    n = x.shape[0]
    chunks = min(n // BLOCK + 1, CHUNKS)
    for chunk in numba.prange(chunks):
        lo, hi = chunk * n // chunks, (chunk + 1) * n // chunks
        xs, os_, ins = x[lo:hi], out[lo:hi], inside[lo:hi]
        for i in range(hi - lo):
            q = np.rint(xs[i] * inv_step)
            os_[i] = min(max(q, qmin), qmax) * step
            ins[i] = np.uint8(1 if qmin <= q <= qmax else 0)


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def masked_grad(grad, inside, out):  # type: ignore[no-untyped-def]
    """out = grad where ``inside`` else 0."""
    n = grad.shape[0]
    chunks = min(n // BLOCK + 1, CHUNKS)
    zero = np.float32(0.0)
    for chunk in numba.prange(chunks):
        lo, hi = chunk * n // chunks, (chunk + 1) * n // chunks
        gs, ins, os_ = grad[lo:hi], inside[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            os_[i] = gs[i] if ins[i] else zero
