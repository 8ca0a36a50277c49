"""The fast CPU backend: numba kernels and exact low-rank GEMMs, bit-exact with ``torch_ref``.

* ``sc_matmul``: 32 stream bits packed per word; OR-of-AND is one AND and one OR per word.
* ``analog_matmul``: integer partial sums per array with the ADC applied in registers.
* ``lut_matmul``: for tables with an exact integer factorization (``luts.factor``), ``r`` float32
  GEMMs over K-chunks small enough that float32 sums stay exact; otherwise a gather kernel.
* ``sc_conv2d``, ``analog_conv2d``, ``lut_conv2d``: the same ops as convolutions, run directly
  on the input (no im2col); layers use them when the backend offers them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from approxctl import streams
from approxctl.backends import cpu_kernels, lowrank

INT32_SAFE = (1 << 31) - 1
# analog_conv2d's accumulators per pixel for groups of 16 to 31 output channels: LLVM runs its
# loop over the outputs vectorized only from 32 iterations on, so below that the loop is scalar;
# zero weights up to 32 made ResNet-tiny's 16-channel layers 1.5x faster (the 2-core AVX2 CPU
# of 2026-12-07), for twice the multiply-adds. Fewer than 16 channels are left as they are.
ANALOG_VECTOR = 32


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


def _stream_tables(
    length: int, k: int, phase_a: tuple[int, int], phase_b: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Packed (phase, value) stream tables and the phases of K reduction indices, A then B."""
    dtype = _word_dtype(length)
    return (
        _packed_stream_table(length, "a", dtype),
        streams.phases(k, length, phase_a).numpy(),
        _packed_stream_table(length, "b", dtype),
        streams.phases(k, length, phase_b).numpy(),
    )


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
    table_a, pa, table_b, pb = _stream_tables(length, k, phase_a, phase_b)

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


def _output_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _padded(x: torch.Tensor, padding: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    xp = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    return np.ascontiguousarray(xp.numpy().astype(dtype))


def _geometry(
    w: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int], groups: int
) -> np.ndarray:
    kh, kw = w.shape[2:]
    return np.array([kh, kw, stride[0], stride[1], dilation[0], dilation[1], groups], np.int64)


def sc_conv2d(
    x: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int,
    *,
    phase_a: tuple[int, int],
    phase_b: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """SC convolution, equal to ``sc_matmul`` on im2col patches per group: int32
    ``ones(pos) - ones(neg)`` of shape (N, O, OH, OW). x: (N, C, H, W) stream values."""
    o, cg, kh, kw = b_pos.shape
    k = cg * kh * kw
    table_a, pa, table_b, pb = _stream_tables(length, k, phase_a, phase_b)

    def weight_streams(b: torch.Tensor) -> np.ndarray:
        values = b.reshape(groups, o // groups, k).numpy().astype(np.int64)
        packed = table_b[pb[None, None, :], values, :]  # (G, O_g, K_g, W)
        return np.ascontiguousarray(packed.transpose(0, 2, 3, 1))

    xp = _padded(x, padding, np.dtype(np.uint16 if length >= 256 else np.uint8))
    out_h = _output_size(xp.shape[2], kh, stride[0], dilation[0])
    out_w = _output_size(xp.shape[3], kw, stride[1], dilation[1])
    out = np.empty((x.shape[0], o, out_h, out_w), dtype=np.int32)
    if out.size:
        # streams of one 32-bit word (L <= 32, the default): two pixels per 64-bit AND
        one_word = table_a.dtype == np.uint32 and table_a.shape[2] == 1
        kernel = cpu_kernels.sc_conv2d_paired if one_word else cpu_kernels.sc_conv2d
        kernel(
            xp, pa, table_a, weight_streams(b_pos), weight_streams(b_neg),
            _geometry(b_pos, stride, dilation, groups), out,
        )  # fmt: skip
    return torch.from_numpy(out)


def analog_conv2d(
    x: torch.Tensor,
    b: torch.Tensor,
    array_size: int,
    adc_bits: int,
    adc_max: int,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Analog convolution, equal to ``analog_matmul`` on im2col patches per group: int64
    ADC code sums of shape (N, O, OH, OW). x: (N, C, H, W) in [0, 255]."""
    o, cg, kh, kw = b.shape
    acc = np.int32 if 255 * 127 * array_size <= INT32_SAFE else np.int64
    values = b.reshape(groups, o // groups, cg * kh * kw).numpy()
    b_pos = np.ascontiguousarray(np.maximum(values, 0).transpose(0, 2, 1).astype(acc))
    b_neg = np.ascontiguousarray(np.maximum(-values, 0).transpose(0, 2, 1).astype(acc))
    if ANALOG_VECTOR // 2 <= o // groups < ANALOG_VECTOR:  # zero weights up to one full vector
        widen = ((0, 0), (0, 0), (0, ANALOG_VECTOR - o // groups))
        b_pos, b_neg = np.pad(b_pos, widen), np.pad(b_neg, widen)
    xp = _padded(x, padding, np.dtype(acc))
    out_h = _output_size(xp.shape[2], kh, stride[0], dilation[0])
    out_w = _output_size(xp.shape[3], kw, stride[1], dilation[1])
    out = np.empty((x.shape[0], o, out_h, out_w), dtype=np.int64)
    if out.size:
        cpu_kernels.analog_conv2d(
            xp, b_pos, b_neg, array_size, (1 << adc_bits) - 1, adc_max,
            _geometry(b, stride, dilation, groups), out,
        )  # fmt: skip
    return torch.from_numpy(out)
