"""The fast CPU backend: numba kernels and exact low-rank GEMMs, bit-exact with ``torch_ref``.

* ``sc_matmul``: 32 stream bits packed per word; OR-of-AND is one AND and one OR per word.
* ``analog_matmul``: integer partial sums per array with the ADC applied in registers.
* ``lut_matmul``: for tables with an exact integer factorization (``luts.factor``), ``r`` float32
  GEMMs over K-chunks small enough that float32 sums stay exact; otherwise a gather kernel.
* ``lut_conv2d`` / ``sc``-free convolution helpers let layers skip im2col where a convolution
  does the same work (see ``approxctl.backends.lowrank``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from approxctl import streams
from approxctl.backends import cpu_kernels, lowrank

INT32_SAFE = (1 << 31) - 1


@functools.cache
def _packed_stream_table(length: int, which: str, dtype_name: str) -> np.ndarray:
    """Packed streams T[phase, value, word] for every phase and value (SPEC 3.2 bit rule)."""
    dtype = np.dtype(dtype_name)
    word_bits = dtype.itemsize * 8
    words = max(1, length // word_bits)
    c = streams.cycle(length, which).numpy()
    t = np.arange(length)
    table = np.zeros((length, length + 1, words), dtype=dtype)
    for phase in range(length):
        thresholds = c[(t + phase) % length]  # (L,)
        for value in range(length + 1):
            bits = thresholds < value
            for w in range(words):
                chunk = bits[w * word_bits : (w + 1) * word_bits]
                word = 0
                for i, bit in enumerate(chunk):
                    word |= int(bit) << i
                table[phase, value, w] = word
    return table


def _word_dtype(length: int) -> str:
    return "uint32" if length <= 32 else "uint64"


def sc_matmul(
    a: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int = 32,
    *,
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A,
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B,
) -> torch.Tensor:
    n, k = a.shape
    o = b_pos.shape[0]
    dtype = _word_dtype(length)
    table_a = _packed_stream_table(length, "a", dtype)
    table_b = _packed_stream_table(length, "b", dtype)
    pa = streams.phases(k, length, phase_a).numpy()
    pb = streams.phases(k, length, phase_b).numpy()

    def weight_streams(b: torch.Tensor) -> np.ndarray:
        # (K, W, O): the packed stream of each weight, laid out for the kernel's inner loop.
        packed = table_b[pb[None, :], b.numpy().astype(np.int64), :]  # (O, K, W)
        return np.ascontiguousarray(packed.transpose(1, 2, 0))

    out = np.empty((n, o, 2), dtype=np.int64)
    if n and o:
        cpu_kernels.sc_or_and(
            np.ascontiguousarray(a.numpy().astype(np.uint16 if length >= 256 else np.uint8)),
            pa,
            table_a,
            weight_streams(b_pos),
            weight_streams(b_neg),
            out,
        )
    return torch.from_numpy(out)


def analog_matmul(
    a: torch.Tensor, b: torch.Tensor, array_size: int, adc_bits: int, adc_max: int
) -> torch.Tensor:
    n, _ = a.shape
    o = b.shape[0]
    levels = (1 << adc_bits) - 1
    largest = 255 * 127 * array_size
    acc = np.int32 if largest <= INT32_SAFE else np.int64
    bn = b.numpy()
    b_pos = np.ascontiguousarray(np.maximum(bn, 0).T.astype(acc))
    b_neg = np.ascontiguousarray(np.maximum(-bn, 0).T.astype(acc))
    out = np.empty((n, o), dtype=np.int64)
    if n and o:
        cpu_kernels.analog_adc(
            np.ascontiguousarray(a.numpy().astype(acc)), b_pos, b_neg, array_size, levels,
            adc_max, out,
        )  # fmt: skip
    return torch.from_numpy(out)


@functools.cache
def _signed_product_table(lut_bytes: bytes, size: int, signed: bool) -> tuple[np.ndarray, int, int]:
    """(V, V) int32 table indexed by offset operands, the offset, and an all-zero row or -1."""
    lut = np.frombuffer(lut_bytes, dtype=np.int64).reshape(size, size)
    if signed:
        table, offset = lut.astype(np.int32), 128
    else:
        values = np.arange(-(size - 1), size)
        mag, sign = np.abs(values), np.sign(values)
        table = (sign[:, None] * sign[None, :] * lut[mag[:, None], mag[None, :]]).astype(np.int32)
        offset = size - 1
    zero_rows = np.flatnonzero(~table.any(axis=1))
    skip = int(offset if offset in zero_rows else (zero_rows[0] if len(zero_rows) else -1))
    return table, offset, skip


def lut_matmul(
    a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, signed: bool = False
) -> torch.Tensor:
    factors = lowrank.factors_for_lut(lut)
    if factors is not None:
        return lowrank.lut_matmul(a, b, lut, signed, factors)
    lut64 = lut.to(torch.int64).contiguous()
    table, offset, skip = _signed_product_table(lut64.numpy().tobytes(), lut.shape[0], signed)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int64)
    if out.size:
        cpu_kernels.lut_gather(
            np.ascontiguousarray((a.numpy() + offset).astype(np.int16)),
            np.ascontiguousarray((b.numpy() + offset).astype(np.int16).T),
            table,
            skip,
            out,
        )
    return torch.from_numpy(out)


lut_conv2d = lowrank.lut_conv2d
