"""Integer convolutions of 8-bit operands on CPU through oneDNN (VNNI), exact to the bit.

The proxy of ``approx-mult`` is the plain accumulation of the quantized operands (SPEC 3.1): a
convolution of 8-bit integers. In float32 it costs as much as the float layer; oneDNN's int8
convolution (``torch.ops.onednn``, what torch's x86 quantization lowers to) runs it on the CPU's
VNNI instructions, 2-3x faster for this project's layers, and its int32 sums are exact.

Used only where it is exact:

* the CPU has VNNI (``avx512_vnni``, ``avx_vnni`` or AMX). Without it oneDNN multiplies with
  ``vpmaddubsw``, whose 16-bit pair sums saturate for 8-bit operands (oneDNN's documented int8
  caveat), so the sums could be wrong;
* a first call checks extreme operands (every product at +-127 x 255 and mixed) against float64,
  with groups, stride, dilation and padding, and disables the path if any sum differs;
* ``APPROXCTL_CPU_INT8=0`` turns it off (the callers then run the same integer convolution in
  float32, which is exact while the sums stay below 2^24; see ``approxctl.quantized_conv``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


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
    plain tensor of the same shape."""
    out_channels = weight.shape[0]
    ones = torch.ones(out_channels)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    packed = torch.ops.onednn.qconv_prepack(
        weight, ones, 1.0, zero_point, stride, padding, dilation, groups, list(codes.shape)
    )
    return torch.ops.onednn.qconv2d_pointwise(
        codes, 1.0, zero_point, packed, ones, torch.zeros(out_channels, dtype=torch.int64),
        None, stride, padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def _self_test() -> bool:
    """Whether ``conv2d`` gives float64's sums on operands that saturate 16-bit pair sums."""
    gen = torch.Generator().manual_seed(0)
    cases = [  # (codes, zero point, weight, stride, padding, dilation, groups)
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
    for codes, zero_point, weight, stride, padding, dilation, groups in cases:
        geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
        got = conv2d(codes, zero_point, weight, *geometry)
        want = F.conv2d(codes.double() - zero_point, weight.double(), None, *geometry)
        if not torch.equal(got, want.float()):
            return False
    return True


@functools.cache
def available() -> bool:
    """Whether ``conv2d`` runs, exactly, on this machine (checked once per process)."""
    if os.environ.get("APPROXCTL_CPU_INT8", "1") == "0":
        return False
    if not (_ops_present() and _cpu_has_vnni()):
        return False
    try:
        return _self_test()
    except RuntimeError:  # oneDNN refused a shape or format: do without it
        return False
