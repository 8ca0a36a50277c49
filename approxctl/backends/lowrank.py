"""Exact LUT GEMMs and convolutions as float32 GEMMs/convs of integer low-rank factors.

With ``lut == left @ right`` exactly (``luts.factor``), ``sum_k lut[a_k, b_k]`` is
``sum_r sum_k left[a_k, r] right[r, b_k]``: each operand is replaced by its r-vector embedding and
one float32 GEMM (or convolution over r times the channels) does the rest. Float32 sums of
integers are exact while every partial sum stays below 2^24, so K is cut into chunks of at most
``2^24 / bound`` products, and the chunk results are summed in float64.

Zero padding is applied to the integer operands before embedding, so padded positions contribute
``lut[0, w]`` exactly as the im2col reference does (signed tables need not map 0 to 0).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from approxctl.luts.factor import FLOAT32_EXACT, LutFactors, factors_for

# Rows of the embedded operand materialized at once in lut_matmul (bounds temporary memory).
ROW_BLOCK = 4096
# Largest embedded operand kept for reuse between calls, in float32 elements (1 GiB).
WORKSPACE_MAX = 1 << 28

_workspace = threading.local()


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` flattened to (index.numel(), r), into a buffer reused between calls on CPU.

    The embedded activations are r times the layer input (142 MB for ResNet-tiny's first
    layers at batch 128), above glibc's largest mmap threshold (32 MB), so a fresh tensor is a
    fresh mapping whose page faults cost five times the gather itself (measured 47-53 ms
    against 9.4 ms into a reused buffer). The result is consumed by the convolution or GEMM
    that follows and is dead before the next call; buffers above WORKSPACE_MAX are not kept.
    """
    rows, width = index.numel(), table.shape[1]
    needed = rows * width
    if table.device.type != "cpu" or needed > WORKSPACE_MAX:
        return table[index.reshape(-1)]
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.numel() < needed or buffer.dtype != table.dtype:
        buffer = torch.empty(needed, dtype=table.dtype)
        _workspace.buffer = buffer
    out = buffer[:needed].view(rows, width)
    return torch.index_select(table, 0, index.reshape(-1), out=out)


def factors_for_lut(lut: torch.Tensor) -> LutFactors | None:
    return factors_for(lut)


@functools.cache
def _embeddings_cpu(factors: LutFactors, signed: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    size = factors.left.shape[0]
    if signed:
        return (
            torch.from_numpy(factors.left.astype(np.float32)),
            torch.from_numpy(np.ascontiguousarray(factors.right.T).astype(np.float32)),
            128,
        )
    values = np.arange(-(size - 1), size)
    mag, sign = np.abs(values), np.sign(values).astype(np.float32)[:, None]
    emb_a = sign * factors.left[mag].astype(np.float32)  # (2M-1, r)
    emb_b = sign * factors.right.T[mag].astype(np.float32)
    return torch.from_numpy(emb_a), torch.from_numpy(emb_b), size - 1


def embeddings(
    factors: LutFactors, signed: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Activation and weight embeddings (value + offset -> r floats) and the offset."""
    emb_a, emb_b, offset = _embeddings_cpu(factors, signed)
    return emb_a.to(device), emb_b.to(device), offset


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Make sure oneDNN runs float32 convolutions in full IEEE precision (no bf16/tf32)."""
    conv = getattr(torch.backends.mkldnn, "conv", None)
    previous = getattr(conv, "fp32_precision", None)
    if previous not in (None, "none", "ieee"):
        conv.fp32_precision = "ieee"  # type: ignore[union-attr]
    try:
        yield
    finally:
        if previous not in (None, "none", "ieee"):
            conv.fp32_precision = previous  # type: ignore[union-attr]


def lut_matmul(
    a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, signed: bool, factors: LutFactors
) -> torch.Tensor:
    n, k = a.shape
    o = b.shape[0]
    emb_a, emb_b, offset = embeddings(factors, signed, a.device)
    chunk = max(1, FLOAT32_EXACT // factors.bound)  # products per exact float32 sum
    out = torch.zeros((n, o), dtype=torch.float64, device=a.device)
    # Embeddings are gathered one K-chunk at a time: a whole (O, K*r) weight embedding is
    # r times the float weight (6 GB for VGG's 25088x4096 layer at rank 15). Every partial sum
    # is an exact integer, so the chunk order and GEMM layout cannot change the result.
    with ieee_float32():
        for start in range(0, k, chunk):
            cols = slice(start, start + chunk)
            width = (min(start + chunk, k) - start) * factors.rank
            b_emb = emb_b[b[:, cols].to(torch.int64) + offset].reshape(o, width)
            for rows in range(0, n, ROW_BLOCK):
                block = a[rows : rows + ROW_BLOCK, cols].to(torch.int64) + offset
                a_emb = _gather_rows(emb_a, block).view(block.shape[0], width)
                out[rows : rows + ROW_BLOCK] += (a_emb @ b_emb.T).double()
    return out.to(torch.int64)


def lut_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    lut: torch.Tensor,
    signed: bool,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor | None:
    """Exact LUT convolution of integer x (N,C,H,W) and w (O,C/g,kh,kw), int64 (N,O,H',W').

    Returns None when the table has no factorization or one input channel's window already
    exceeds the float32-exact bound (callers then use im2col + ``lut_matmul``).
    """
    factors = factors_for(lut)
    if factors is None:
        return None
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    og = o // groups
    window = kh * kw
    per_chunk = FLOAT32_EXACT // (factors.bound * window)  # input channels per exact chunk
    if per_chunk < 1:
        return None
    chunks = -(-cg // per_chunk)
    cpc = -(-cg // chunks)  # balanced chunks: pad each group to chunks * cpc channels
    pad_c = chunks * cpc - cg
    r = factors.rank
    emb_a, emb_b, offset = embeddings(factors, signed, x.device)

    xi = F.pad(x.to(torch.int64), (padding[1], padding[1], padding[0], padding[0]))
    h, wd = xi.shape[-2:]
    if pad_c:  # padded channels get value 0 here and a zero weight embedding below
        xi = F.pad(xi.view(n, groups, cg, h, wd), (0, 0, 0, 0, 0, pad_c)).view(n, -1, h, wd)
    # Channels-last gather: (N, H, W, C', r) is the memory layout conv wants for C'*r channels.
    index = (xi + offset).permute(0, 2, 3, 1).contiguous()
    a_emb = _gather_rows(emb_a, index).view(n, h, wd, -1).permute(0, 3, 1, 2)

    w_emb = emb_b[w.to(torch.int64) + offset]  # (O, Cg, kh, kw, r)
    w_emb = w_emb.permute(0, 1, 4, 2, 3).reshape(groups, og, cg, r, kh, kw)
    if pad_c:
        w_emb = F.pad(w_emb, (0, 0, 0, 0, 0, 0, 0, pad_c))
    w_emb = (
        w_emb.reshape(groups, og, chunks, cpc * r, kh, kw)
        .transpose(1, 2)
        .reshape(groups * chunks * og, cpc * r, kh, kw)
    )
    with ieee_float32():
        y = F.conv2d(a_emb, w_emb, None, stride, 0, dilation, groups * chunks)
    y = y.view(n, groups, chunks, og, *y.shape[-2:])
    total = y[:, :, 0].to(torch.int64) if chunks == 1 else y.double().sum(2).to(torch.int64)
    return total.reshape(n, o, *y.shape[-2:])
