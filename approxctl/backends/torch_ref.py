"""The reference backend: the functional ops of SPEC section 3 written plainly in torch.

This module *defines* the bit-exact results; it favours obviousness over speed. Inputs are
assumed valid (``approxctl.functional`` validates them). Every op works on CPU and CUDA tensors
and bounds its temporary memory by processing rows of ``a`` in chunks, so its result cannot depend
on the chunk size.
"""

from __future__ import annotations

import torch

from approxctl import streams

# Temporaries are kept near this many elements per chunk (a few hundred MB at most).
CHUNK_ELEMENTS = 1 << 24


def _row_slices(n: int, per_row: int) -> list[slice]:
    """Slices of ``n`` rows, each small enough that rows * per_row stays under the budget."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def lut_matmul(
    a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, signed: bool = False
) -> torch.Tensor:
    """Unsigned: sum_k sign(a)sign(b) lut[|a|,|b|]; signed: sum_k lut[a+128, b+128]."""
    n, k = a.shape
    o = b.shape[0]
    m = lut.shape[0]
    flat = lut.to(device=a.device, dtype=torch.int32).reshape(-1)
    if signed:
        row_a = (a.to(torch.int64) + 128) * m
        col_b = b.to(torch.int64) + 128
    else:
        row_a = a.abs().to(torch.int64) * m
        col_b = b.abs().to(torch.int64)
        sign_a = torch.sign(a).to(torch.int32)
        sign_b = torch.sign(b).to(torch.int32)
    out = torch.empty((n, o), dtype=torch.int64, device=a.device)
    for rows in _row_slices(n, 2 * o * k):
        products = flat[row_a[rows, None, :] + col_b[None, :, :]]  # (n', O, K)
        if not signed:
            products = products * (sign_a[rows, None, :] * sign_b[None, :, :])
        out[rows] = products.sum(dim=-1, dtype=torch.int64)
    return out


def sc_matmul(
    a: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int = 32,
    *,
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A,
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B,
) -> torch.Tensor:
    """Ones in the OR-accumulated positive and negative output streams, int64 (N, O, 2).

    For each stream bit t, ``OR_k (a_bit AND b_bit)`` is ``(sum_k a_bit * b_bit) > 0``: a 0/1
    matrix product, exact in float32 because all terms are non-negative.
    """
    n, k = a.shape
    o = b_pos.shape[0]
    device = a.device
    thr_a = streams.thresholds(k, length, "a", phase_a, device)  # (L, K)
    thr_b = streams.thresholds(k, length, "b", phase_b, device)
    # Weight stream bits, (L, K, 2O): positive then negative weights, ready for a batched matmul.
    b_both = torch.cat([b_pos, b_neg], dim=0).to(torch.int64)
    b_bits = (thr_b[:, :, None] < b_both.T[None, :, :]).to(torch.float32)
    out = torch.empty((n, o, 2), dtype=torch.int64, device=device)
    for rows in _row_slices(n, length * (k + 2 * o)):
        a_bits = (thr_a[:, None, :] < a[rows].to(torch.int64)[None, :, :]).to(torch.float32)
        any_one = torch.bmm(a_bits, b_bits) > 0  # (L, n', 2O): OR over K of the ANDed bits
        ones = any_one.sum(dim=0, dtype=torch.int64)  # popcount over the L stream bits
        out[rows, :, 0] = ones[:, :o]
        out[rows, :, 1] = ones[:, o:]
    return out


def adc_code(p: torch.Tensor, adc_bits: int, adc_max: int) -> torch.Tensor:
    """ADC output code of SPEC 3.3: round-half-up of p*(2^bits-1)/adc_max, clamped, in int64."""
    levels = (1 << adc_bits) - 1
    q = torch.div(2 * p * levels + adc_max, 2 * adc_max, rounding_mode="floor")
    return q.clamp_(0, levels)


def analog_matmul(
    a: torch.Tensor, b: torch.Tensor, array_size: int, adc_bits: int, adc_max: int
) -> torch.Tensor:
    """sum over arrays of (ADC(a . b+) - ADC(a . b-)), int64 (N, O)."""
    n, k = a.shape
    o = b.shape[0]
    arrays = -(-k // array_size)
    pad = arrays * array_size - k  # a shorter last array equals a full one padded with zeros
    # float64 products of integers below 2^53 are exact, and float64 matmul runs on CPU and CUDA.
    a3 = torch.nn.functional.pad(a.to(torch.float64), (0, pad)).view(n, arrays, array_size)
    b64 = torch.nn.functional.pad(b.to(torch.float64), (0, pad)).view(o, arrays, array_size)
    b_pos = b64.clamp(min=0).permute(1, 2, 0)  # (arrays, S, O)
    b_neg = (-b64).clamp(min=0).permute(1, 2, 0)
    out = torch.empty((n, o), dtype=torch.int64, device=a.device)
    for rows in _row_slices(n, arrays * (array_size + 4 * o)):
        chunk = a3[rows].transpose(0, 1)  # (arrays, n', S)
        p_pos = torch.bmm(chunk, b_pos).round().to(torch.int64)  # (arrays, n', O) partial sums
        p_neg = torch.bmm(chunk, b_neg).round().to(torch.int64)
        codes = adc_code(p_pos, adc_bits, adc_max) - adc_code(p_neg, adc_bits, adc_max)
        out[rows] = codes.sum(dim=0)
    return out
