"""Host side of the CUDA kernels in ``approxctl/kernels/*.cu``, independent of CuPy.

Everything a launch needs is decided here on torch tensors: the operands converted to the
kernels' element types, the tables the kernels read (packed SC streams built from the LFSR
cycles of :mod:`approxctl.streams`, phase tables, the prepared multiplier table, the injected
error's polynomials and quantile table), the output buffers, the kernel name, grid, block and
dynamic shared memory. :mod:`cupy_backend` runs the resulting :class:`Launch` objects with CuPy
(:mod:`cuda_pointwise` for the pointwise kernels); tests run the very same plans through a
C++ emulation of the kernels on the CPU (tests/test_kernels_emulated.py), so the planning logic
is checked without a GPU.

Inputs are assumed valid (``approxctl.functional`` validates them), exactly as in ``torch_ref``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from approxctl import streams
from approxctl.noise import TABLE_BITS, NoiseSpec, draw_key, normal_quantiles

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"

# NVRTC options the backend passes to cupy.RawModule.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)
# Options cupy.RawModule adds itself (besides -arch=sm_XX for the device): the compile test
# (tests/test_kernels_compile.py) builds with these too, for sm_80 and sm_90, with ptxas
# warnings as errors, and fails on any line in the compile log.
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")


def _lut_names() -> tuple[str, ...]:
    return tuple(
        f"lut_matmul_{t}_{mode}_{place}"
        for t in ("i16", "u16", "i32")
        for mode in ("unsigned", "signed")
        for place in ("shared", "global")
    )


# Source file (without .cu) -> the extern "C" kernels it defines.
KERNELS: dict[str, tuple[str, ...]] = {
    "lut_matmul": _lut_names(),
    "sc_matmul": ("sc_matmul",),
    "analog_matmul": ("analog_matmul_acc32", "analog_matmul_acc64"),
    "pointwise": (
        "add_error",
        "sc_proxy_forward",
        "sc_proxy_backward",
        "hardtanh_proxy_forward",
        "hardtanh_proxy_backward",
    ),
}

THREADS = 256  # every kernel: 256 threads computing a 64 x 64 output tile
TILE = 64
INT32_MAX = (1 << 31) - 1
# Static shared memory of the lut kernels: four int arrays of TILE_K x (TILE + 1).
LUT_STATIC_SHARED = 4 * 16 * (TILE + 1) * 4
# The analog kernel's ADC arithmetic is exact for adc_max below this (see analog_matmul.cu).
ANALOG_ADC_MAX_LIMIT = 1 << 40


def source(module: str) -> str:
    return (KERNEL_DIR / f"{module}.cu").read_text()


def source_files() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``module``.cu's ``kernel`` over ``grid`` blocks of ``block`` threads.

    ``args`` are torch tensors (passed as device pointers) and numpy scalars (passed by value
    with their exact C type: int32 -> int, int64 -> long long, float32 -> float).
    """

    module: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: tuple[Any, ...]


def _blocks(rows: int) -> int:
    return -(-rows // TILE)


def fits_kernels(n: int, o: int, k: int) -> bool:
    """The kernels count rows and K in 32-bit ints and put O's tiles on the grid's y axis
    (at most 65535 blocks); larger problems use the reference."""
    return n <= INT32_MAX and k <= INT32_MAX and _blocks(o) <= 65535


def _int16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int16).contiguous()


# ------------------------------------------------------------------------------------ LUT
@dataclass(frozen=True)
class PreparedLut:
    """A multiplier table ready for the kernel: entries as int32 (wrapping exactly like the
    reference's ``lut.to(torch.int32)``), narrowed to 16 bits when every entry fits."""

    table: torch.Tensor  # (M, M), int16 holding int16 or uint16 bit patterns, or int32
    kind: str  # "i16", "u16" or "i32": how the kernel reads an entry
    size: int  # M


def prepare_lut(lut: torch.Tensor, signed: bool, device: torch.device) -> PreparedLut:
    table = lut.to(device=device, dtype=torch.int32).clone(memory_format=torch.contiguous_format)
    if not signed:
        # sign(0) = 0: a zero activation or weight contributes nothing whatever lut[0, x] holds,
        # so the kernel may apply signs as a plain negation of the entry.
        table[0, :] = 0
        table[:, 0] = 0
    size = int(table.shape[0])
    lo, hi = int(table.min()), int(table.max())
    if lo >= -(1 << 15) and hi < 1 << 15:
        return PreparedLut(table.to(torch.int16), "i16", size)
    if lo >= 0 and hi < 1 << 16:
        bits = torch.where(table >= 1 << 15, table - (1 << 16), table)  # uint16 bit patterns
        return PreparedLut(bits.to(torch.int16), "u16", size)
    return PreparedLut(table, "i32", size)


class _LutCache:
    """Prepared tables per (table tensor, signed, device), valid while the same tensor object is
    alive and unmodified (its version counter unchanged): preparing reads the table's range,
    which synchronizes the device, so layers that pass the same table every step pay once."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.entries: dict[tuple[int, bool, str], tuple[Any, int, PreparedLut]] = {}

    def get(self, lut: torch.Tensor, signed: bool, device: torch.device) -> PreparedLut:
        try:
            version = lut._version
        except RuntimeError:  # inference tensors keep no version counter: prepare every time
            return prepare_lut(lut, signed, device)
        key = (id(lut), signed, str(device))
        entry = self.entries.get(key)
        if entry is not None:
            ref, seen_version, prepared = entry
            if ref() is lut and seen_version == version:
                return prepared
        prepared = prepare_lut(lut, signed, device)
        if len(self.entries) >= self.capacity:
            self.entries.clear()
        self.entries[key] = (weakref.ref(lut), version, prepared)
        return prepared


_lut_cache = _LutCache()


def plan_lut_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    lut: torch.Tensor,
    signed: bool,
    *,
    dynamic_shared_limit: int,
) -> tuple[Launch, torch.Tensor]:
    """The lut kernel launch and its (N, O) int64 output buffer. ``dynamic_shared_limit`` is
    the most dynamic shared memory a block may get on the device; a table that does not fit is
    read from global memory instead."""
    n, k = a.shape
    o = b.shape[0]
    prepared = _lut_cache.get(lut, signed, a.device)
    table_bytes = prepared.table.numel() * prepared.table.element_size()
    place = "shared" if table_bytes <= dynamic_shared_limit else "global"
    name = f"lut_matmul_{prepared.kind}_{'signed' if signed else 'unsigned'}_{place}"
    out = torch.empty((n, o), dtype=torch.int64, device=a.device)
    launch = Launch(
        module="lut_matmul",
        kernel=name,
        grid=(_blocks(n), _blocks(o), 1),
        block=(THREADS, 1, 1),
        shared_mem=table_bytes if place == "shared" else 0,
        args=(
            _int16(a), _int16(b), prepared.table, out,
            np.int32(n), np.int32(o), np.int32(k), np.int32(prepared.size),
        ),
    )  # fmt: skip
    return launch, out


# ------------------------------------------------------------------------------------- SC
def stream_words(length: int) -> int:
    """32-bit words per packed stream (L = 16 uses the low half of one word)."""
    return max(1, length // 32)


@functools.cache
def packed_streams(length: int, which: str) -> np.ndarray:
    """uint32 (L, L + 1, words): word w of the stream of value q at phase p, bit i = stream bit
    t = 32 w + i, with bit t = (C[(t + p) mod L] < q) (SPEC 3.2, C from approxctl.streams)."""
    c = streams.cycle(length, which).numpy()
    t = np.arange(length)
    thresholds = c[(t[None, :] + np.arange(length)[:, None]) % length]  # (phase, t)
    values = np.arange(length + 1)
    bits = thresholds[:, None, :] < values[None, :, None]  # (phase, value, t)
    words = stream_words(length)
    per_word = min(32, length)
    weights = np.left_shift(np.uint64(1), np.arange(per_word, dtype=np.uint64))
    chunks = bits.reshape(length, length + 1, words, per_word).astype(np.uint64)
    return (chunks * weights).sum(axis=-1).astype(np.uint32)


@functools.cache
def _packed_streams_on(length: int, which: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(packed_streams(length, which).view(np.int32)).to(device)


@functools.lru_cache(maxsize=128)
def _phases_on(k: int, length: int, rule: tuple[int, int], device: torch.device) -> torch.Tensor:
    return streams.phases(k, length, rule).to(torch.int32).to(device)


def plan_sc_matmul(
    a: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int,
    phase_a: tuple[int, int],
    phase_b: tuple[int, int],
) -> tuple[Launch, torch.Tensor]:
    """The sc kernel launch (one grid layer per stream word) and its zeroed (N, O, 2) output."""
    n, k = a.shape
    o = b_pos.shape[0]
    device = a.device
    words = stream_words(length)
    out = torch.zeros((n, o, 2), dtype=torch.int64, device=device)
    launch = Launch(
        module="sc_matmul",
        kernel="sc_matmul",
        grid=(_blocks(n), _blocks(o), words),
        block=(THREADS, 1, 1),
        shared_mem=0,
        args=(
            _int16(a), _int16(b_pos), _int16(b_neg),
            _phases_on(k, length, tuple(phase_a), device),
            _phases_on(k, length, tuple(phase_b), device),
            _packed_streams_on(length, "a", device), _packed_streams_on(length, "b", device),
            out, np.int32(n), np.int32(o), np.int32(k), np.int32(length), np.int32(words),
        ),
    )  # fmt: skip
    return launch, out


# --------------------------------------------------------------------------------- analog
def plan_analog_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    array_size: int,
    adc_bits: int,
    adc_max: int,
    *,
    wide_accumulator: bool | None = None,
) -> tuple[Launch, torch.Tensor]:
    """The analog kernel launch and its (N, O) int64 output. Requires adc_max below
    ``ANALOG_ADC_MAX_LIMIT`` (the caller falls back to the reference beyond it). Partial sums
    are int32 when 255 * 127 * array_size fits, else int64 (``wide_accumulator`` overrides,
    for tests)."""
    n, k = a.shape
    o = b.shape[0]
    # An array longer than K is one array holding all of K: the same partial sums.
    size = min(int(array_size), max(k, 1))
    if wide_accumulator is None:
        wide_accumulator = 255 * 127 * size > INT32_MAX
    acc = "acc64" if wide_accumulator else "acc32"
    levels = (1 << adc_bits) - 1
    out = torch.empty((n, o), dtype=torch.int64, device=a.device)
    launch = Launch(
        module="analog_matmul",
        kernel=f"analog_matmul_{acc}",
        grid=(_blocks(n), _blocks(o), 1),
        block=(THREADS, 1, 1),
        shared_mem=0,
        args=(
            _int16(a), _int16(b), out, np.int32(n), np.int32(o), np.int32(k), np.int32(size),
            np.int64(levels), np.int64(adc_max), np.float32(1.0 / (2.0 * adc_max)),
        ),
    )  # fmt: skip
    return launch, out


# ------------------------------------------------------------------------------ pointwise
# The pointwise kernels loop over their elements grid-stride; more blocks than this gain nothing.
POINTWISE_MAX_BLOCKS = 1 << 16


@dataclass(frozen=True)
class NoiseArgs:
    """The injected error's kernel arguments (``kernels/pointwise.cu``): ``params`` =
    [lo, hi, mu_min, mu_max, sigma_max, mu[0..m), sigma[0..m)] as float32 on the device, the
    per-call hash ``key``, the quantile ``table`` and the hash ``shift`` that indexes it;
    ``draw`` False for a kernel that adds no error."""

    draw: bool
    params: torch.Tensor
    m: int
    key: int
    table: torch.Tensor
    shift: int

    def args(self) -> tuple[Any, ...]:
        return (self.params, np.int32(self.m), np.int64(self.key), self.table,
                np.int32(self.shift))  # fmt: skip


@functools.cache
def _quantiles_on(device: torch.device) -> torch.Tensor:
    return normal_quantiles().to(device)


def noise_args(spec: NoiseSpec | None, device: torch.device) -> NoiseArgs:
    """``NoiseArgs`` of an error model's ``NoiseSpec`` (None: no error), with a fresh key drawn
    from torch's CPU generator, as the CPU kernels draw theirs (``NoiseSpec.kernel_args``)."""
    table, shift = _quantiles_on(device), 32 - TABLE_BITS
    if spec is None:
        params = torch.tensor([-1.0, 1.0, -np.inf, np.inf, np.inf, 0.0, 0.0], device=device)
        return NoiseArgs(False, params, 1, 0, table, shift)
    key = draw_key()
    m = max(spec.mu_coef.numel(), spec.sigma_coef.numel())
    bounds = torch.tensor(
        [spec.lo, spec.hi, spec.mu_min, spec.mu_max, spec.sigma_max], dtype=torch.float32
    ).to(device)
    coefs = [  # the shorter polynomial padded with zeros on top, which leave Horner's rule exact
        torch.nn.functional.pad(
            c.detach().reshape(-1).to(device, torch.float32), (0, m - c.numel())
        )
        for c in (spec.mu_coef, spec.sigma_coef)
    ]
    return NoiseArgs(True, torch.cat([bounds, *coefs]), m, key, table, shift)


def _pointwise_launch(kernel: str, n: int, args: tuple[Any, ...]) -> Launch:
    blocks = max(1, min(-(-n // THREADS), POINTWISE_MAX_BLOCKS))
    return Launch("pointwise", kernel, (blocks, 1, 1), (THREADS, 1, 1), 0, args)


def _flat32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def plan_add_error(
    y: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
    channels: int, inner: int, noise: NoiseArgs,
) -> Launch:  # fmt: skip
    """out = y + error(v) * scale[c], v = (y - bias[c]) / scale[c]; ``y`` and ``out`` contiguous
    float32 (``out`` may be ``y``), ``scale`` and ``bias`` from ``noise.channel_values``."""
    n = y.numel()
    return _pointwise_launch("add_error", n, (
        y, out, np.int64(n), np.int32(channels), np.int64(inner), scale, bias, *noise.args(),
    ))  # fmt: skip


def plan_sc_proxy_forward(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
    channels: int, inner: int, noise: NoiseArgs,
) -> tuple[Launch, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """SC_act's forward: the launch and its (out, e_pos, e_neg), shaped like ``z_pos``."""
    z_pos, z_neg = _flat32(z_pos), _flat32(z_neg)
    out, e_pos, e_neg = (torch.empty_like(z_pos) for _ in range(3))
    n = z_pos.numel()
    launch = _pointwise_launch("sc_proxy_forward", n, (
        z_pos, z_neg, out, e_pos, e_neg, np.int64(n), np.int32(channels), np.int64(inner),
        scale, bias, np.int32(noise.draw), *noise.args(),
    ))  # fmt: skip
    return launch, out, e_pos, e_neg


def plan_sc_proxy_backward(
    grad: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, scale: torch.Tensor,
    channels: int, inner: int,
) -> tuple[Launch, torch.Tensor, torch.Tensor]:  # fmt: skip
    grad = _flat32(grad)
    grad_pos, grad_neg = torch.empty_like(grad), torch.empty_like(grad)
    n = grad.numel()
    launch = _pointwise_launch("sc_proxy_backward", n, (
        grad, e_pos, e_neg, grad_pos, grad_neg, np.int64(n), np.int32(channels),
        np.int64(inner), scale,
    ))  # fmt: skip
    return launch, grad_pos, grad_neg


def plan_hardtanh_proxy_forward(
    zs: tuple[torch.Tensor, ...], limit: float, scale: torch.Tensor, bias: torch.Tensor,
    channels: int, inner: int, noise: NoiseArgs,
) -> tuple[Launch, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Analog_act's forward of two or four accumulations: the launch, its output and its
    uint8 masks (bit j: 0 <= z_j <= limit)."""
    zs = tuple(_flat32(z) for z in zs)
    four = len(zs) == 4
    z0, z1 = zs[0], zs[1]
    z2, z3 = (zs[2], zs[3]) if four else (z0, z1)  # not read without ``four``
    out = torch.empty_like(z0)
    inside = torch.empty(z0.shape, dtype=torch.uint8, device=z0.device)
    n = z0.numel()
    launch = _pointwise_launch("hardtanh_proxy_forward", n, (
        z0, z1, z2, z3, np.int32(four), np.float32(limit), out, inside, np.int64(n),
        np.int32(channels), np.int64(inner), scale, bias, np.int32(noise.draw), *noise.args(),
    ))  # fmt: skip
    return launch, out, inside


def plan_hardtanh_proxy_backward(
    grad: torch.Tensor, inside: torch.Tensor, scale: torch.Tensor, channels: int, inner: int,
    terms: int,
) -> tuple[Launch, list[torch.Tensor]]:  # fmt: skip
    """The gradients of the ``terms`` (2 or 4) accumulations from the output gradient."""
    grad = _flat32(grad)
    grads = [torch.empty_like(grad) for _ in range(terms)]
    four = terms == 4
    g2, g3 = (grads[2], grads[3]) if four else (grads[0], grads[1])  # not written without four
    n = grad.numel()
    launch = _pointwise_launch("hardtanh_proxy_backward", n, (
        grad, inside, grads[0], grads[1], g2, g3, np.int32(four), np.int64(n),
        np.int32(channels), np.int64(inner), scale,
    ))  # fmt: skip
    return launch, grads
