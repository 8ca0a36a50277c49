"""Integer convolutions of 8-bit operands on CPU through oneDNN, exact to the bit.

The proxy of ``approx-mult`` is the plain accumulation of the quantized operands (SPEC 3.1): a
convolution of 8-bit integers, and sc's and analog's proxies accumulate 8-bit codes too. In
float32 such a convolution costs as much as the float layer; oneDNN's int8 convolution
(``torch.ops.onednn``, what torch's x86 quantization lowers to) runs it 2-3x faster for this
project's layers, and its int32 sums are exact where the CPU computes them exactly:

* with VNNI (``avx512_vnni``, ``avx_vnni`` or AMX), for every 8-bit operand (``available``);
* without it (AVX2, AVX-512 without VNNI) oneDNN multiplies with ``vpmaddubsw``, which adds two
  products of an unsigned code and a signed weight into a *saturating* 16-bit lane (oneDNN's
  documented int8 caveat): the sums are exact only while no such pair passes 32767 in
  magnitude, i.e. ``2 * code_max * weight_max <= 32767`` (``exact_for``): sc's codes (32 x 32)
  always, analog's (255 x 127) once its weights are shifted to [-64, 63]
  (``approxctl.integer_conv``), approx-mult's 7-bit inputs (127 x 127) with zero point 0.
  Measured on an AMD EPYC with AVX2: codes at 255 with weights at 64 or -64 are exact, at 65
  the sums are off.

Each is used only where a first call checks extreme operands against float64 (``_self_test``:
with groups, stride, dilation and padding, sums past 2^24) and disabled if any sum differs;
``APPROXCTL_CPU_INT8=0`` turns both off (the callers then run the same integer convolution in
float32, which is exact while the sums stay below 2^24; see ``approxctl.integer_conv``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
PAIR_SUM_MAX = 32767  # the largest pair of products a saturating 16-bit lane holds


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _VNNI_FLAGS)
    except OSError:
        pass
    return False  # not Linux, or no flags line: assume no VNNI


def _ops_present() -> bool:
    try:
        torch.ops.onednn.qconv_prepack  # noqa: B018 - raises where torch lacks the op
        torch.ops.onednn.qconv2d_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def conv2d(
    codes: torch.Tensor,
    zero_point: int,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``conv2d(codes - zero_point, weight)`` in float32, exact: ``codes`` uint8 (N, C, H, W),
    ``weight`` int8 (O, C / groups, kh, kw), zero padding. The int32 sums are converted to
    float32 (exact below 2^24, rounded to nearest even above; ``_self_test`` checks both). The
    result is in channels-last memory order (oneDNN's int8 layout); its values are those of a
    plain tensor of the same shape.

    One weight scale for the tensor, not one per channel: the sums are the same, and packing
    per-channel scales reads each back with a scalar ``item()``: 36-80 us of a 117-183 us
    prepack for TinyConv's pairs, paid every call since the weights change every step
    (``benchmarks/int8_prepack.py``)."""
    one, zero = torch.ones(1), torch.zeros(1, dtype=torch.int64)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    packed = torch.ops.onednn.qconv_prepack(
        weight, one, 1.0, zero_point, stride, padding, dilation, groups, list(codes.shape)
    )
    return torch.ops.onednn.qconv2d_pointwise(
        codes, 1.0, zero_point, packed, one, zero,
        None, stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def _full_range_cases(gen: torch.Generator) -> list[tuple]:  # type: ignore[type-arg]
    """(codes, zero point, weight, stride, padding, dilation, groups) at any 8-bit values."""
    return [
        (torch.full((2, 16, 6, 6), 255, dtype=torch.uint8), 0,
         torch.full((8, 16, 3, 3), 127, dtype=torch.int8), 1, 1, 1, 1),
        (torch.full((2, 16, 6, 6), 255, dtype=torch.uint8), 128,
         torch.full((8, 16, 3, 3), -128, dtype=torch.int8), 1, 1, 1, 1),
        (torch.randint(0, 256, (3, 12, 9, 7), generator=gen, dtype=torch.uint8), 128,
         torch.randint(-127, 128, (6, 4, 3, 2), generator=gen, dtype=torch.int8), 2, 1, 2, 3),
        (torch.randint(0, 256, (2, 8, 11, 11), generator=gen, dtype=torch.uint8), 0,
         torch.randint(-128, 128, (8, 1, 5, 5), generator=gen, dtype=torch.int8), 1, 2, 1, 8),
        # sums past 2^24 (up to 255 x 127 x 800): float32 must get them rounded once
        (torch.randint(200, 256, (2, 32, 7, 7), generator=gen, dtype=torch.uint8), 0,
         torch.randint(100, 128, (4, 32, 5, 5), generator=gen, dtype=torch.int8), 1, 0, 1, 1),
    ]  # fmt: skip


def _pair_bounded_cases(gen: torch.Generator) -> list[tuple]:  # type: ignore[type-arg]
    """The same kinds of case with ``2 * code * |weight| <= PAIR_SUM_MAX`` for every pair: at
    the bound (255 x 64, 255 x -64, 127 x -128), mixed signs, zero points."""
    alternating = torch.full((8, 32, 5, 5), 63, dtype=torch.int8)
    alternating[:, ::2] = -64  # neighbouring channels of opposite signs
    return [
        (torch.full((2, 16, 6, 6), 255, dtype=torch.uint8), 0,
         torch.full((8, 16, 3, 3), 64, dtype=torch.int8), 1, 1, 1, 1),
        (torch.full((2, 16, 6, 6), 255, dtype=torch.uint8), 0,
         torch.full((8, 16, 3, 3), -64, dtype=torch.int8), 1, 1, 1, 1),
        (torch.full((2, 16, 6, 6), 127, dtype=torch.uint8), 64,
         torch.full((8, 16, 3, 3), -128, dtype=torch.int8), 1, 1, 1, 1),
        (torch.full((2, 32, 8, 8), 255, dtype=torch.uint8), 0, alternating, 1, 2, 1, 1),
        (torch.randint(0, 256, (3, 12, 9, 7), generator=gen, dtype=torch.uint8), 0,
         torch.randint(-64, 65, (6, 4, 3, 2), generator=gen, dtype=torch.int8), 2, 1, 2, 3),
        (torch.randint(0, 128, (2, 8, 11, 11), generator=gen, dtype=torch.uint8), 100,
         torch.randint(-128, 128, (8, 1, 5, 5), generator=gen, dtype=torch.int8), 1, 2, 1, 8),
        # sums past 2^24 (255 x 64 x 1152): rounded once
        (torch.randint(250, 256, (2, 128, 5, 5), generator=gen, dtype=torch.uint8), 0,
         torch.randint(60, 65, (4, 128, 3, 3), generator=gen, dtype=torch.int8), 1, 0, 1, 1),
    ]  # fmt: skip


def _self_test(pair_bounded: bool = False) -> bool:
    """Whether ``conv2d`` gives float64's sums on extreme operands: any 8-bit ones (which
    saturate 16-bit pair sums), or with ``pair_bounded`` those within ``PAIR_SUM_MAX``."""
    gen = torch.Generator().manual_seed(0)
    cases = _pair_bounded_cases(gen) if pair_bounded else _full_range_cases(gen)
    for codes, zero_point, weight, stride, padding, dilation, groups in cases:
        geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
        got = conv2d(codes, zero_point, weight, *geometry)
        want = F.conv2d(codes.double() - zero_point, weight.double(), None, *geometry)
        if not torch.equal(got, want.float()):
            return False
    return True


def _passes(pair_bounded: bool) -> bool:
    try:
        return _self_test(pair_bounded)
    except RuntimeError:  # oneDNN refused a shape or format: do without it
        return False


def _enabled() -> bool:
    return os.environ.get("APPROXCTL_CPU_INT8", "1") != "0" and _ops_present()


@functools.cache
def available() -> bool:
    """Whether ``conv2d`` runs, exactly, on this machine for any 8-bit operands (checked once
    per process)."""
    return _enabled() and _cpu_has_vnni() and _passes(pair_bounded=False)


@functools.cache
def _pair_bounded_available() -> bool:
    return _enabled() and _passes(pair_bounded=True)


def exact_for(code_max: int, weight_max: int) -> bool:
    """Whether ``conv2d`` is exact here for codes in [0, ``code_max``] and weights of
    magnitude at most ``weight_max`` (-128 counts 128): on any CPU where pairs of products fit a
    16-bit lane, with VNNI for all."""
    if 2 * code_max * weight_max <= PAIR_SUM_MAX and _pair_bounded_available():
        return True
    return available()
