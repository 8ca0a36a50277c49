"""numba kernels around an integer convolution on CPU: 8-bit activation codes in, float
outputs with the injected error out (``approxctl.quantized_conv``).

``quantize_codes`` writes what the integer convolution reads (uint8 codes ``q + zero_point``)
and what the straight-through gradient needs (the in-range mask); ``dequantize_codes`` gives
back the fake-quantized float input for the weight gradient, bit for bit what
``fake_quant_forward`` writes, so the input need not be kept in float. ``quantize_planes`` (sc's
and analog's inputs) writes the codes in oneDNN's channels-last order and the fake-quantized
input in one pass. ``affine_output`` reads the
convolution's sums in any memory order (oneDNN's int8 convolution writes channels-last) and
writes the float output in the plain (N, C, H, W) order, drawing the error (SPEC section 4) in the
same pass.
"""

from __future__ import annotations

import numba
import numpy as np

from approxctl.backends.cpu_pointwise import BLOCK, CHUNKS, _draw_eps, _error_at
from approxctl.backends.numba_cache import process_safe

TILE = 256  # output pixels per task of affine_output (fewer measured slower, more no faster)


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_codes(x, inv_step, qmin, qmax, zero_point, codes, inside):  # type: ignore[no-untyped-def]
    """codes = clamp(rint(x * inv_step), qmin, qmax) + zero_point (uint8), as
    ``fake_quant_forward`` rounds; ``inside`` = 1 where the rounded value lies in [qmin, qmax].
    Returns the number of NaN inputs (their codes are ``zero_point``)."""
    n = x.shape[0]
    chunks = min(n // BLOCK + 1, CHUNKS)
    nans = np.zeros(chunks, dtype=np.int64)
    zero = np.float32(0.0)
    for chunk in numba.prange(chunks):
        lo, hi = chunk * n // chunks, (chunk + 1) * n // chunks
        xs, cs, ins = x[lo:hi], codes[lo:hi], inside[lo:hi]
        bad = 0
        for i in range(hi - lo):
            q = np.rint(xs[i] * inv_step)
            finite = q == q
            clamped = min(max(q, qmin), qmax) if finite else zero
            cs[i] = np.uint8(np.int32(clamped) + zero_point)
            ins[i] = np.uint8(1 if qmin <= q <= qmax else 0)
            bad += 0 if finite else 1
        nans[chunk] = bad
    return nans.sum()


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_planes(x, samples, inner, inv_step, step, qmax, codes, words, inside, out):  # type: ignore[no-untyped-def]
    """``quantize_codes`` (zero point 0, qmin 0) of a flat (N, C, P) ``x`` that writes the
    codes in channels-last order (N, P, C), the order oneDNN's int8 convolution reads (a
    separate transpose of them measured as long as this whole pass), and ``out`` = the
    fake-quantized x (N, C, P), as ``fake_quant_forward`` writes it, in the same pass.
    ``inside`` (N, C, P) as in ``quantize_codes``. ``words``: ``codes``' buffer viewed as
    uint64 where C is a multiple of 8 on a little-endian machine (each word then holds 8
    channels' codes, the lowest channel in the low byte, and is written with one store), else
    empty. Returns the number of NaN inputs (codes 0, ``out`` NaN) and the number of inputs
    outside [0, qmax] (NaNs included): none, and the straight-through gradient needs no mask.

    Work goes in tasks of one sample and up to TILE pixels, all channels: a tile's codes are
    transposed in cache."""
    channels = x.shape[0] // (samples * inner)
    tile, tiles, tasks, chunks = _tasks(samples, inner)
    nans = np.zeros(chunks, dtype=np.int64)
    outside = np.zeros(chunks, dtype=np.int64)
    zero = np.float32(0.0)
    for chunk in numba.prange(chunks):
        block = np.empty(channels * TILE, dtype=np.uint8)  # a tile's codes, (C, tile)
        bad, out_of_range = 0, 0
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            sample = task // tiles
            first = (task - sample * tiles) * tile
            m = min(tile, inner - first)
            for c in range(channels):
                at = (sample * channels + c) * inner + first
                xs, os_, ins = x[at : at + m], out[at : at + m], inside[at : at + m]
                bs = block[c * TILE : c * TILE + m]
                for i in range(m):
                    q = np.rint(xs[i] * inv_step)
                    finite = q == q
                    clamped = min(max(q, zero), qmax)
                    os_[i] = clamped * step
                    within = zero <= q <= qmax
                    ins[i] = np.uint8(1 if within else 0)
                    bs[i] = np.uint8(np.int32(clamped if finite else zero))
                    bad += 0 if finite else 1
                    out_of_range += 0 if within else 1
            if words.shape[0]:
                for c8 in range(channels // 8):
                    rows = block[c8 * 8 * TILE :]
                    for i in range(m):
                        word = np.uint64(0)
                        for b in range(8):
                            word |= np.uint64(rows[b * TILE + i]) << np.uint64(8 * b)
                        words[(sample * inner + first + i) * (channels // 8) + c8] = word
                continue
            for i in range(m):
                dst = (sample * inner + first + i) * channels
                for c in range(channels):
                    codes[dst + c] = block[c * TILE + i]
        nans[chunk] = bad
        outside[chunk] = out_of_range
    return nans.sum(), outside.sum()


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def dequantize_codes(codes, zero_point, step, out):  # type: ignore[no-untyped-def]
    """out = (codes - zero_point) * step in float32."""
    n = codes.shape[0]
    chunks = min(n // BLOCK + 1, CHUNKS)
    zp = np.float32(zero_point)
    for chunk in numba.prange(chunks):
        lo, hi = chunk * n // chunks, (chunk + 1) * n // chunks
        cs, os_ = codes[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            os_[i] = (np.float32(cs[i]) - zp) * step


@numba.njit(inline="always")
def _tasks(samples, inner):  # type: ignore[no-untyped-def]
    """How the output passes cut their work: tasks of one sample and up to TILE pixels, all
    channels; ``(tile, tiles per sample, tasks, parallel chunks)``."""
    tile = min(inner, TILE)
    tiles = (inner + tile - 1) // tile
    tasks = samples * tiles
    return tile, tiles, tasks, min(tasks, CHUNKS)


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def affine_output(  # type: ignore[no-untyped-def]
    acc, stride_n, stride_c, stride_p, samples, inner,
    noise, key, mu_coef, sigma_coef, lo, hi, bounds, table, shift,
    scale, factor, bias, out,
):  # fmt: skip
    """out[n, c, p] = (v + error(v)) * s_c + bias[c] (no error unless ``noise``), s_c = scale[c] *
    factor in float32, with
    v = acc[n * stride_n + c * stride_c + p * stride_p]; ``out`` is flat (N, C, P) and
    ``inner`` = P pixels per (sample, channel).

    Work goes in tasks of one sample and up to TILE pixels, all channels. The error of a run of
    pixels of one channel is drawn from the element indices of ``out``, so the values depend on
    neither the input's memory order nor the number of threads.
    """
    channels = scale.shape[0]
    tile, tiles, tasks, chunks = _tasks(samples, inner)
    for chunk in numba.prange(chunks):
        v = np.empty(TILE, dtype=np.float32)
        t = np.empty(TILE, dtype=np.float32)
        hashes = np.empty(TILE // 2 + 1, dtype=np.uint32)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            sample = task // tiles
            first = (task - sample * tiles) * tile
            m = min(tile, inner - first)
            for c in range(channels):
                src = sample * stride_n + c * stride_c + first * stride_p
                row = acc[src : src + (m - 1) * stride_p + 1 : stride_p]
                for i in range(m):  # a gather of its own, so the loops below vectorize
                    v[i] = row[i]
                start = (sample * channels + c) * inner + first
                s_c, b_c, os_ = scale[c] * factor, bias[c], out[start : start + m]
                if noise:
                    _draw_eps(start, m, key, table, shift, t, hashes)
                    for i in range(m):
                        e = _error_at(v[i], t[i], mu_coef, sigma_coef, lo, hi, bounds)
                        os_[i] = (v[i] + e) * s_c + b_c
                else:
                    for i in range(m):
                        os_[i] = v[i] * s_c + b_c


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def window_sums(codes, dims, geometry, out):  # type: ignore[no-untyped-def]
    """out[n, g, ho, wo] = the sum of the uint8 codes that output position's window reads, over
    group g's channels (zero padding outside), as float32: exact, since the callers' sums stay
    below 2^24 and every partial sum of non-negative integers is smaller than the total.
    ``codes`` flat (N, H, W, C) (channels-last); ``dims`` = (N, C, H, W, groups, Ho, Wo);
    ``geometry`` = (kh, kw, stride h, stride w, padding h, padding w, dilation h, dilation w);
    ``out`` flat (N, groups, Ho, Wo).

    One task per sample: its pixels' per-group code sums into zero-padded planes, then each
    output row as kh x kw row additions (summing each window's taps one by one measured 5x
    slower)."""
    samples, channels, height, width = dims[0], dims[1], dims[2], dims[3]
    groups, out_h, out_w = dims[4], dims[5], dims[6]
    kh, kw, sh, sw = geometry[0], geometry[1], geometry[2], geometry[3]
    ph, pw, dh, dw = geometry[4], geometry[5], geometry[6], geometry[7]
    per_group = channels // groups
    # planes padded so every tap lies inside: no bounds test in the row loop
    hp = max(height + ph, (out_h - 1) * sh + (kh - 1) * dh + 1)
    wp = max(width + pw, (out_w - 1) * sw + (kw - 1) * dw + 1)
    plane = height * width * channels
    for n in numba.prange(samples):
        pixels = np.zeros(groups * hp * wp, dtype=np.float32)
        acc = np.empty(out_w, dtype=np.float32)
        for g in range(groups):
            for h in range(height):
                for w in range(width):
                    # unsigned: a signed offset gets a wraparound check that stops the channel
                    # loop from vectorizing (6x slower here)
                    first = np.uint64(n * plane + (h * width + w) * channels + g * per_group)
                    total = np.int32(0)
                    for c in range(per_group):
                        total += np.int32(codes[first + np.uint64(c)])
                    pixels[(g * hp + h + ph) * wp + w + pw] = np.float32(total)
            for ho in range(out_h):
                acc[:] = 0
                for i in range(kh):
                    row = (g * hp + ho * sh + i * dh) * wp
                    for j in range(kw):
                        at = np.uint64(row + j * dw)
                        for wo in range(out_w):
                            acc[wo] += pixels[at + np.uint64(wo * sw)]
                at = ((n * groups + g) * out_h + ho) * out_w
                out[at : at + out_w] = acc


@process_safe
@numba.njit(parallel=True, cache=True, nogil=True)
def pair_outputs(  # type: ignore[no-untyped-def]
    acc, stride_n, stride_c, stride_p, samples, inner, window, groups, shift, factor,
    out_pos, out_neg,
):  # fmt: skip
    """The two sums of one int8 convolution over [w+; w-] (``PairCodes``), each in the plain
    (N, O, H, W) order: out_pos[n, c, p] = (v + shift * window[n, g, p]) * factor with
    v = acc[n * stride_n + a * stride_c + p * stride_p], g = c's group and a = c's channel in
    ``acc``, where each group's w+ channels are followed by its w- channels; out_neg the same
    of the w- channel. ``window`` (N, groups, P) is read only where ``shift`` is not 0. The
    product ``shift * window`` is exact, so with fused multiply-add or without, the sum is
    rounded once."""
    channels = out_pos.shape[0] // (samples * inner)
    per_group = channels // groups
    tile, tiles, tasks, chunks = _tasks(samples, inner)
    for chunk in numba.prange(chunks):
        v = np.empty(TILE, dtype=np.float32)
        for task in range(chunk * tasks // chunks, (chunk + 1) * tasks // chunks):
            sample = task // tiles
            first = (task - sample * tiles) * tile
            m = min(tile, inner - first)
            for a in range(2 * channels):
                src = sample * stride_n + a * stride_c + first * stride_p
                row = acc[src : src + (m - 1) * stride_p + 1 : stride_p]
                for i in range(m):  # a gather of its own, so the loops below vectorize
                    v[i] = row[i]
                group, within = a // (2 * per_group), a % (2 * per_group)
                positive = within < per_group
                channel = group * per_group + (within if positive else within - per_group)
                if shift != 0:
                    at = (sample * groups + group) * inner + first
                    ws = window[at : at + m]
                    for i in range(m):
                        v[i] += shift * ws[i]
                start = (sample * channels + channel) * inner + first
                os_ = out_pos[start : start + m] if positive else out_neg[start : start + m]
                for i in range(m):
                    os_[i] = v[i] * factor
