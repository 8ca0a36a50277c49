"""numba kernels for the fast CPU backend (compiled on first use, cached on disk).

Each kernel walks rows in parallel and keeps one accumulator per output column, so the inner
loop runs over output columns (contiguous, SIMD-friendly) while a row's input value is reused for
all of them. Inputs that are zero contribute nothing in every target (a zero stream, a zero
product), so they are skipped: after a ReLU that is often most of them.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.numba_cache import process_safe


@numba.njit(inline="always")
def _popcount64(x: np.uint64) -> int:
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def sc_or_and(a, phase_a, table_a, b_pos, b_neg, out):  # type: ignore[no-untyped-def]
    """OR over k of (stream(a[r,k]) AND stream(b[o,k])), popcounted, for both weight signs.

    a: (R, K) uint8 stream values; phase_a: (K,) activation phases; table_a: (L, L+1, W)
    packed activation streams by (phase, value); b_pos, b_neg: (K, W, O) packed weight streams;
    out: (R, O, 2) int64.
    """
    rows, depth = a.shape
    words = table_a.shape[2]
    outs = b_pos.shape[2]
    for r in numba.prange(rows):
        acc_p = np.zeros((words, outs), dtype=table_a.dtype)
        acc_n = np.zeros((words, outs), dtype=table_a.dtype)
        for k in range(depth):
            value = a[r, k]
            if value == 0:
                continue
            for w in range(words):
                word = table_a[phase_a[k], value, w]
                for o in range(outs):
                    acc_p[w, o] |= word & b_pos[k, w, o]
                    acc_n[w, o] |= word & b_neg[k, w, o]
        for o in range(outs):
            ones_p = 0
            ones_n = 0
            for w in range(words):
                ones_p += _popcount64(np.uint64(acc_p[w, o]))
                ones_n += _popcount64(np.uint64(acc_n[w, o]))
            out[r, o, 0] = ones_p
            out[r, o, 1] = ones_n


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def analog_adc(a, b_pos, b_neg, array_size, levels, adc_max, out):  # type: ignore[no-untyped-def]
    """sum over arrays of ADC(partial sum of a * b+) - ADC(partial sum of a * b-).

    a: (R, K), b_pos, b_neg: (K, O) non-negative ints, all of the accumulator dtype (int32 when
    the largest partial sum fits, else int64); out: (R, O) int64. The ADC code is
    floor((2 p levels + adc_max) / (2 adc_max)) clamped to [0, levels], computed in float64,
    which is exact because the numerator stays below 2^53 (checked by the caller).
    """
    rows, depth = a.shape
    outs = b_pos.shape[1]
    two_max = 2.0 * adc_max
    for r in numba.prange(rows):
        total = np.zeros(outs, dtype=np.int64)
        p_pos = np.zeros(outs, dtype=b_pos.dtype)
        p_neg = np.zeros(outs, dtype=b_pos.dtype)
        for start in range(0, depth, array_size):
            p_pos[:] = 0
            p_neg[:] = 0
            used = False
            for k in range(start, min(depth, start + array_size)):
                value = a[r, k]
                if value == 0:
                    continue
                used = True
                for o in range(outs):
                    p_pos[o] += value * b_pos[k, o]
                    p_neg[o] += value * b_neg[k, o]
            if not used:  # all-zero inputs give partial sums 0 and ADC code 0
                continue
            for o in range(outs):
                q_pos = np.floor((2.0 * levels * p_pos[o] + adc_max) / two_max)
                q_neg = np.floor((2.0 * levels * p_neg[o] + adc_max) / two_max)
                total[o] += np.int64(min(q_pos, levels)) - np.int64(min(q_neg, levels))
        out[r, :] = total


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def lut_gather(a, b, table, skip_row, out):  # type: ignore[no-untyped-def]
    """out[r, o] = sum_k table[a[r, k], b[k, o]] with indices already offset to be >= 0.

    a: (R, K) int16 row indices; b: (K, O) int16 column indices; table: (V, V) int32 holding the
    signed products (sign-magnitude already applied); skip_row: a row index whose table row is
    all zeros (or -1); out: (R, O) int64.
    """
    rows, depth = a.shape
    outs = b.shape[1]
    for r in numba.prange(rows):
        acc = np.zeros(outs, dtype=np.int64)
        for k in range(depth):
            row = a[r, k]
            if row == skip_row:
                continue
            for o in range(outs):
                acc[o] += table[row, b[k, o]]
        out[r, :] = acc


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def sc_conv2d(x, phase_a, table_a, b_pos, b_neg, geometry, out):  # type: ignore[no-untyped-def]
    """Direct SC convolution: ``sc_or_and`` on every output position without im2col.

    x: (N, C, H, W) uint8 stream values, already zero-padded; b_pos, b_neg: (G, K_g, W, O_g)
    packed weight streams with K_g ordered (channel, kh, kw) within the group, as im2col
    orders it; phase_a: (K_g,); geometry: (kh, kw, stride_h, stride_w, dil_h, dil_w, groups);
    out: (N, O, OH, OW) int32 = ones(positive stream) - ones(negative stream).
    """
    n_batch, channels, _, _ = x.shape
    kh, kw, sh, sw, dh, dw, groups = geometry
    oh_size, ow_size = out.shape[2], out.shape[3]
    words = table_a.shape[2]
    og = b_pos.shape[3]
    cg = channels // groups
    for row in numba.prange(n_batch * oh_size):
        n = row // oh_size
        oh = row % oh_size
        acc_p = np.zeros((words, og), dtype=table_a.dtype)
        acc_n = np.zeros((words, og), dtype=table_a.dtype)
        for ow in range(ow_size):
            for g in range(groups):
                acc_p[:, :] = 0
                acc_n[:, :] = 0
                k = 0
                for c in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            value = x[n, g * cg + c, oh * sh + i * dh, ow * sw + j * dw]
                            if value != 0:
                                for w in range(words):
                                    word = table_a[phase_a[k], value, w]
                                    for o in range(og):
                                        acc_p[w, o] |= word & b_pos[g, k, w, o]
                                        acc_n[w, o] |= word & b_neg[g, k, w, o]
                            k += 1
                for o in range(og):
                    ones = 0
                    for w in range(words):
                        ones += _popcount64(np.uint64(acc_p[w, o]))
                        ones -= _popcount64(np.uint64(acc_n[w, o]))
                    out[n, g * og + o, oh, ow] = ones


# Output pixels of one row that ``sc_conv2d_paired`` runs together, two per 64-bit word (its
# accumulation is written out for these four words).
PAIRED_PIXELS = 8


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def sc_conv2d_paired(x, phase_a, table_a, b_pos, b_neg, geometry, out):  # type: ignore[no-untyped-def]
    """``sc_conv2d`` for streams of one 32-bit word (L <= 32), same arguments and result.

    ``sc_conv2d`` loads each weight's stream once per output pixel and reads and writes its
    accumulators once per reduction index. Here the weight streams are widened to 64 bits (the
    stream in both halves), so one AND-OR serves two pixels whose activation words share a
    64-bit word; a block of PAIRED_PIXELS pixels of a row reuses each weight load for all of
    them, and each pass over the block's accumulators ORs in two reduction indices. On
    TinyConv's layers (batch 128, the 2-core AVX2 CPU of 2026-12-07) that measured 1.3-2.2x
    faster than ``sc_conv2d`` (docs/benchmarks.md). Reduction indices where every pixel of the
    block reads a zero input are skipped, as ``sc_conv2d`` skips zero inputs.
    """
    n_batch, channels, _, _ = x.shape
    kh, kw, sh, sw, dh, dw, groups = geometry
    oh_size, ow_size = out.shape[2], out.shape[3]
    og = b_pos.shape[3]
    cg = channels // groups
    depth = cg * kh * kw
    pairs = PAIRED_PIXELS // 2
    high = np.uint64(32)
    low = np.uint64(0xFFFFFFFF)
    wide_pos = np.empty((groups, depth, og), dtype=np.uint64)
    wide_neg = np.empty((groups, depth, og), dtype=np.uint64)
    for g in range(groups):
        for k in range(depth):
            for o in range(og):
                v = np.uint64(b_pos[g, k, 0, o])
                wide_pos[g, k, o] = v | (v << high)
                v = np.uint64(b_neg[g, k, 0, o])
                wide_neg[g, k, o] = v | (v << high)
    for row in numba.prange(n_batch * oh_size):
        n = row // oh_size
        oh = row % oh_size
        # the block's activation words at the live reduction indices (one spare row: an odd
        # count is padded with zero words, which OR in nothing)
        words = np.empty((depth + 1, pairs), dtype=np.uint64)
        live = np.empty(depth + 1, dtype=np.int64)
        acc_p = np.empty((pairs, og), dtype=np.uint64)
        acc_n = np.empty((pairs, og), dtype=np.uint64)
        for g in range(groups):
            for ow0 in range(0, ow_size, PAIRED_PIXELS):
                full = ow0 + PAIRED_PIXELS <= ow_size  # no pixel past the row's end
                count = 0
                k = 0
                for c in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            phase = phase_a[k]
                            channel, r, col = g * cg + c, oh * sh + i * dh, ow0 * sw + j * dw
                            seen = np.uint64(0)
                            for q in range(pairs):
                                word = np.uint64(0)
                                if full:
                                    at = col + 2 * q * sw
                                    word = np.uint64(table_a[phase, x[n, channel, r, at], 0])
                                    bits = np.uint64(table_a[phase, x[n, channel, r, at + sw], 0])
                                    word |= bits << high
                                else:
                                    for half in range(2):
                                        if ow0 + 2 * q + half < ow_size:
                                            value = x[n, channel, r, col + (2 * q + half) * sw]
                                            bits = np.uint64(table_a[phase, value, 0])
                                            word |= bits << np.uint64(32 * half)
                                words[count, q] = word
                                seen |= word
                            if seen != 0:
                                live[count] = k
                                count += 1
                            k += 1
                if count % 2:
                    live[count] = live[count - 1]
                    words[count, :] = 0
                    count += 1
                acc_p[:, :] = 0
                acc_n[:, :] = 0
                for t in range(0, count, 2):
                    k0, k1 = live[t], live[t + 1]
                    # written out for the four words so that the o loop vectorizes
                    a0, a1, a2, a3 = words[t, 0], words[t, 1], words[t, 2], words[t, 3]
                    b0, b1 = words[t + 1, 0], words[t + 1, 1]
                    b2, b3 = words[t + 1, 2], words[t + 1, 3]
                    for o in range(og):
                        p0, n0 = wide_pos[g, k0, o], wide_neg[g, k0, o]
                        p1, n1 = wide_pos[g, k1, o], wide_neg[g, k1, o]
                        acc_p[0, o] |= (a0 & p0) | (b0 & p1)
                        acc_p[1, o] |= (a1 & p0) | (b1 & p1)
                        acc_p[2, o] |= (a2 & p0) | (b2 & p1)
                        acc_p[3, o] |= (a3 & p0) | (b3 & p1)
                        acc_n[0, o] |= (a0 & n0) | (b0 & n1)
                        acc_n[1, o] |= (a1 & n0) | (b1 & n1)
                        acc_n[2, o] |= (a2 & n0) | (b2 & n1)
                        acc_n[3, o] |= (a3 & n0) | (b3 & n1)
                for p in range(min(PAIRED_PIXELS, ow_size - ow0)):
                    shift = np.uint64(32 * (p % 2))
                    for o in range(og):
                        ones = _popcount64((acc_p[p // 2, o] >> shift) & low)
                        ones -= _popcount64((acc_n[p // 2, o] >> shift) & low)
                        out[n, g * og + o, oh, ow0 + p] = ones


# Output pixels of one row that ``analog_conv2d`` runs together (the loop below is written out
# for four).
ANALOG_PIXELS = 4


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def analog_conv2d(x, b_pos, b_neg, array_size, levels, adc_max, geometry, out):  # type: ignore[no-untyped-def]
    """Direct analog convolution: ``analog_adc`` on every output position without im2col.

    x: (N, C, H, W) non-negative ints of the accumulator dtype, already zero-padded;
    b_pos, b_neg: (G, K_g, O_w) of the same dtype, K_g ordered (channel, kh, kw), where the
    first O_g = O / G of the O_w >= O_g columns are the weights and the rest zero (a width the
    output loop vectorizes at); arrays are consecutive runs of ``array_size`` along K_g; out:
    (N, O, OH, OW) int64 code sums.

    ANALOG_PIXELS neighbouring pixels of a row are accumulated together, so each weight load
    serves all of them; with the code sums kept in float64 that measured 1.3-1.75x faster on
    TinyConv's layers than one pixel at a time with int64 sums (the 2-core AVX2 CPU of
    2026-12-07). Reduction indices where all of them read a zero input are
    skipped, and so is the ADC of an array none of them saw a non-zero input in: a zero partial
    sum converts to code 0, so converting it or not gives the same total.
    """
    n_batch, channels, _, _ = x.shape
    kh, kw, sh, sw, dh, dw, groups = geometry
    oh_size, ow_size = out.shape[2], out.shape[3]
    og = out.shape[1] // groups
    width = b_pos.shape[2]
    cg = channels // groups
    two_max = 2.0 * adc_max
    for row in numba.prange(n_batch * oh_size):
        n = row // oh_size
        oh = row % oh_size
        # code sums in float64: exact (|sum| <= arrays x levels), and the ADC's float64 codes
        # need no conversion per array, which AVX2 cannot vectorize
        total = np.empty((ANALOG_PIXELS, width), dtype=np.float64)
        p_pos = np.zeros((ANALOG_PIXELS, width), dtype=b_pos.dtype)
        p_neg = np.zeros((ANALOG_PIXELS, width), dtype=b_pos.dtype)
        zero = x.dtype.type(0)
        for g in range(groups):
            for ow0 in range(0, ow_size, ANALOG_PIXELS):
                total[:, :] = 0
                k = 0
                filled = 0  # inputs in the current array so far
                used = False  # any non-zero input in the current array
                for c in range(cg):
                    for i in range(kh):
                        for j in range(kw):
                            r, col = oh * sh + i * dh, ow0 * sw + j * dw
                            channel = g * cg + c
                            v0 = x[n, channel, r, col]
                            v1 = x[n, channel, r, col + sw] if ow0 + 1 < ow_size else zero
                            v2 = x[n, channel, r, col + 2 * sw] if ow0 + 2 < ow_size else zero
                            v3 = x[n, channel, r, col + 3 * sw] if ow0 + 3 < ow_size else zero
                            if (v0 | v1 | v2 | v3) != 0:
                                used = True
                                for o in range(width):
                                    bp, bn = b_pos[g, k, o], b_neg[g, k, o]
                                    p_pos[0, o] += v0 * bp
                                    p_pos[1, o] += v1 * bp
                                    p_pos[2, o] += v2 * bp
                                    p_pos[3, o] += v3 * bp
                                    p_neg[0, o] += v0 * bn
                                    p_neg[1, o] += v1 * bn
                                    p_neg[2, o] += v2 * bn
                                    p_neg[3, o] += v3 * bn
                            k += 1
                            filled += 1
                            if filled == array_size:  # the array is full: convert, restart
                                if used:
                                    _adc_pixels(p_pos, p_neg, levels, adc_max, two_max, total)
                                filled = 0
                                used = False
                if used:  # a shorter last array
                    _adc_pixels(p_pos, p_neg, levels, adc_max, two_max, total)
                for p in range(min(ANALOG_PIXELS, ow_size - ow0)):
                    for o in range(og):
                        out[n, g * og + o, oh, ow0 + p] = np.int64(total[p, o])


@numba.njit(inline="always")
def _adc_pixels(p_pos, p_neg, levels, adc_max, two_max, total):  # type: ignore[no-untyped-def]
    """``_adc_accumulate`` of each pixel's partial sums (rows), which it then zeroes, into
    float64 totals."""
    for p in range(total.shape[0]):
        for o in range(total.shape[1]):
            q_pos = np.floor((2.0 * levels * p_pos[p, o] + adc_max) / two_max)
            q_neg = np.floor((2.0 * levels * p_neg[p, o] + adc_max) / two_max)
            total[p, o] += min(q_pos, levels) - min(q_neg, levels)
            p_pos[p, o] = 0
            p_neg[p, o] = 0


@numba.njit(inline="always")
def _adc_accumulate(p_pos, p_neg, levels, adc_max, two_max, total):  # type: ignore[no-untyped-def]
    """total += ADC(p_pos) - ADC(p_neg), the SPEC 3.3 code in exact float64 arithmetic."""
    for o in range(total.shape[0]):
        q_pos = np.floor((2.0 * levels * p_pos[o] + adc_max) / two_max)
        q_neg = np.floor((2.0 * levels * p_neg[o] + adc_max) / two_max)
        total[o] += np.int64(min(q_pos, levels)) - np.int64(min(q_neg, levels))
