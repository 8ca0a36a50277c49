"""Every fast path against the reference backend, bit for bit (SPEC section 7).

The reference ``torch_ref`` is itself checked against plain loops in test_functional_spec.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from approxctl.backends import cpu, lowrank, torch_ref
from approxctl.luts import bundled_luts, load_lut
from approxctl.luts.factor import factorize, factors_for

LUT_NAMES = list(bundled_luts())


def _rand(lo: int, hi: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ LUT
@pytest.mark.parametrize("name", LUT_NAMES)
def test_lut_matmul_every_table_random_and_extreme(name: str) -> None:
    signed = name.startswith("mul8s")
    lut = load_lut(name)
    lo, hi = (-128, 127) if signed else (-(lut.shape[0] - 1), lut.shape[0] - 1)
    a, b = _rand(lo, hi, (37, 301), 1), _rand(lo, hi, (11, 301), 2)
    assert torch.equal(cpu.lut_matmul(a, b, lut, signed), torch_ref.lut_matmul(a, b, lut, signed))
    # All operands at the extreme: the largest sums the float32 chunking must keep exact.
    a_max = torch.full((3, 2000), hi)
    b_max = torch.full((2, 2000), lo if signed else hi)
    assert torch.equal(
        cpu.lut_matmul(a_max, b_max, lut, signed), torch_ref.lut_matmul(a_max, b_max, lut, signed)
    )


def test_factorizations_are_exact_and_bounded() -> None:
    for name in LUT_NAMES:
        table = load_lut(name).numpy()
        factors = factors_for(table)
        if factors is None:
            assert np.linalg.matrix_rank(table.astype(np.float64)) > 24, name
            continue
        assert np.array_equal(factors.left @ factors.right, table), name
        assert factors.bound >= np.abs(table).max()
        assert factors.bound < 1 << 24


def _synthetic_signed_table(rank: int, seed: int) -> torch.Tensor:
    """A signed table of given rank whose row for a = 0 is not zero (unlike EvoApprox's)."""
    rng = np.random.default_rng(seed)
    left = rng.integers(-20, 21, (256, rank))
    right = rng.integers(-20, 21, (rank, 256))
    return torch.from_numpy(left @ right)


def test_user_table_is_factorized_at_run_time() -> None:
    table = _synthetic_signed_table(3, 0)
    factors = factorize(table.numpy())
    assert factors is not None and factors.rank == 3
    a, b = _rand(-128, 127, (20, 50), 3), _rand(-128, 127, (7, 50), 4)
    assert torch.equal(cpu.lut_matmul(a, b, table, True), torch_ref.lut_matmul(a, b, table, True))


@given(
    n=st.integers(1, 9),
    o=st.integers(1, 6),
    k=st.integers(1, 80),
    name=st.sampled_from(["mul7u_09Y", "mul7u_031", "mul8u_17MJ", "mul8s_1KV9", "mul8u_L93"]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=40, deadline=None)
def test_lut_matmul_generated(n: int, o: int, k: int, name: str, seed: int) -> None:
    lut = load_lut(name)
    signed = name.startswith("mul8s")
    lo, hi = (-128, 127) if signed else (-(lut.shape[0] - 1), lut.shape[0] - 1)
    a, b = _rand(lo, hi, (n, k), seed), _rand(lo, hi, (o, k), seed + 1)
    assert torch.equal(cpu.lut_matmul(a, b, lut, signed), torch_ref.lut_matmul(a, b, lut, signed))


CONVS = [
    dict(c=3, o=4, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(c=37, o=5, k=5, stride=1, padding=2, dilation=1, groups=1),  # several padded chunks
    dict(c=8, o=8, k=3, stride=2, padding=1, dilation=1, groups=8),  # depthwise
    dict(c=12, o=6, k=3, stride=1, padding=2, dilation=2, groups=3),
    dict(c=64, o=4, k=7, stride=3, padding=0, dilation=1, groups=2),
    dict(c=5, o=2, k=1, stride=1, padding=0, dilation=1, groups=1),
]


def _im2col_reference(x, w, lut, signed, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    cols = F.unfold(xp.double(), (kh, kw), dilation=dilation, stride=stride).long()
    h_out = (x.shape[2] + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    w_out = (x.shape[3] + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    cols = cols.view(n, groups, cg * kh * kw, -1)
    outs = []
    for g in range(groups):
        rows = cols[:, g].transpose(1, 2).reshape(-1, cg * kh * kw)
        wg = w[g * (o // groups) : (g + 1) * (o // groups)].reshape(o // groups, -1)
        outs.append(torch_ref.lut_matmul(rows, wg, lut, signed).view(n, -1, o // groups))
    return torch.cat(outs, 2).permute(0, 2, 1).reshape(n, o, h_out, w_out)


@pytest.mark.parametrize("geometry", CONVS, ids=str)
@pytest.mark.parametrize("table", ["mul7u_09Y", "mul8u_GTR", "mul8s_1KV8", "synthetic"])
def test_lut_conv2d_equals_im2col_reference(geometry: dict, table: str) -> None:
    g = dict(geometry)
    c, o, k = g.pop("c"), g.pop("o"), g.pop("k")
    if table == "synthetic":
        lut, signed = _synthetic_signed_table(4, 1), True
    else:
        lut, signed = load_lut(table), table.startswith("mul8s")
    lo, hi = (-128, 127) if signed else (-(lut.shape[0] - 1), lut.shape[0] - 1)
    x = _rand(lo, hi, (2, c, 9, 8), 5)
    w = _rand(lo, hi, (o, c // g["groups"], k, k), 6)
    padding = g.pop("padding")
    out = lowrank.lut_conv2d(
        x, w, lut, signed, stride=(g["stride"],) * 2, padding=(padding, padding),
        dilation=(g["dilation"],) * 2, groups=g["groups"],
    )  # fmt: skip
    assert out is not None
    expected = _im2col_reference(
        x, w, lut, signed, g["stride"], padding, g["dilation"], g["groups"]
    )
    assert torch.equal(out, expected)


def test_lut_conv2d_extreme_values_stay_exact() -> None:
    lut = load_lut("mul8u_GTR")
    x = torch.full((1, 96, 6, 6), 255)
    w = torch.full((2, 96, 3, 3), 255)
    out = lowrank.lut_conv2d(
        x, w, lut, False, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1
    )
    assert torch.equal(out, _im2col_reference(x, w, lut, False, 1, 1, 1, 1))


def test_lut_conv2d_unequal_padding_of_height_and_width() -> None:
    """Padding (1, 2), three groups: the index is built channels-last with each side's zero
    border, which must land where the reference's explicit padding puts it."""
    lut = load_lut("mul8u_GTR")
    x, w = _rand(0, 255, (2, 21, 5, 6), 40), _rand(0, 255, (6, 7, 3, 3), 41)
    out = lowrank.lut_conv2d(
        x, w, lut, False, stride=(1, 1), padding=(1, 2), dilation=(1, 1), groups=3
    )
    expected = _im2col_reference(F.pad(x, (2, 2, 1, 1)), w, lut, False, 1, 0, 1, 3)
    assert torch.equal(out, expected)


def test_lut_conv2d_reuses_its_embedding_buffer_across_shapes() -> None:
    """The embedded activations go into one buffer reused between calls: a large, a small and
    a large call again must each be exact, and the small call must not allocate a new one."""
    lut = load_lut("mul7u_09Y")
    shapes = [
        ((3, 8, 11, 11), (4, 8, 3, 3)),
        ((1, 2, 4, 4), (3, 2, 3, 3)),
        ((2, 8, 12, 9), (5, 8, 3, 3)),
    ]
    buffers = []
    for i, (xs, ws) in enumerate(shapes):
        x, w = _rand(-127, 127, xs, 20 + i), _rand(-127, 127, ws, 30 + i)
        out = lowrank.lut_conv2d(
            x, w, lut, False, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1
        )
        assert torch.equal(out, _im2col_reference(x, w, lut, False, 1, 1, 1, 1))
        buffers.append(lowrank._workspace.buffer.data_ptr())
    assert buffers[1] == buffers[0]
    emb = torch.randn(9, 4)
    index = torch.randint(0, 9, (5, 7))
    assert torch.equal(lowrank._gather_rows(emb, index), emb[index].view(35, 4))


# ------------------------------------------------------------------------------- SC
@pytest.mark.parametrize("length", [16, 32, 64, 128, 256])
def test_sc_matmul_every_length(length: int) -> None:
    a = _rand(0, length, (23 if length <= 64 else 4, 2 * length + 3), 7)
    a[:, ::3] = 0  # zero activations take the kernel's skip path
    bp, bn = _rand(0, length, (5, 2 * length + 3), 8), _rand(0, length, (5, 2 * length + 3), 9)
    assert torch.equal(cpu.sc_matmul(a, bp, bn, length), torch_ref.sc_matmul(a, bp, bn, length))


@given(
    n=st.integers(1, 12),
    o=st.integers(1, 9),
    k=st.integers(1, 150),
    length=st.sampled_from([16, 32, 64, 128, 256]),
    phase_a=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    phase_b=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    sparse=st.booleans(),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_sc_matmul_generated(n, o, k, length, phase_a, phase_b, sparse, seed) -> None:  # type: ignore[no-untyped-def]
    hi = 3 if sparse else length  # small values: streams with few ones, rarely saturating
    a, bp, bn = (_rand(0, hi, s, seed + i) for i, s in enumerate([(n, k), (o, k), (o, k)]))
    kwargs = {"phase_a": phase_a, "phase_b": phase_b}
    assert torch.equal(
        cpu.sc_matmul(a, bp, bn, length, **kwargs), torch_ref.sc_matmul(a, bp, bn, length, **kwargs)
    )


def test_sc_matmul_extremes() -> None:
    for value in (0, 32):
        a = torch.full((4, 70), value)
        b = torch.full((3, 70), 32 - value)
        assert torch.equal(cpu.sc_matmul(a, b, b, 32), torch_ref.sc_matmul(a, b, b, 32))


# --------------------------------------------------------------------------- analog
@given(
    n=st.integers(1, 10),
    o=st.integers(1, 7),
    k=st.integers(1, 120),
    array_size=st.sampled_from([1, 2, 9, 25, 64, 121]),
    adc_bits=st.integers(1, 16),
    adc_max=st.integers(1, 3_000_000),
    sparse=st.booleans(),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=80, deadline=None)
def test_analog_matmul_generated(n, o, k, array_size, adc_bits, adc_max, sparse, seed) -> None:  # type: ignore[no-untyped-def]
    a = _rand(0, 255, (n, k), seed)
    if sparse:
        a[a < 200] = 0
    b = _rand(-127, 127, (o, k), seed + 1)
    assert torch.equal(
        cpu.analog_matmul(a, b, array_size, adc_bits, adc_max),
        torch_ref.analog_matmul(a, b, array_size, adc_bits, adc_max),
    )


def test_analog_matmul_int64_accumulators_for_huge_arrays() -> None:
    """Partial sums beyond int32 (255 * 127 * 70000 > 2^31) take the int64 kernel."""
    k = 70_000
    a = torch.full((2, k), 255)
    b = torch.full((2, k), 127)
    b[1] = -127
    for adc_max in (1, 255 * 127 * k, 10**12):
        assert torch.equal(
            cpu.analog_matmul(a, b, k, 8, adc_max), torch_ref.analog_matmul(a, b, k, 8, adc_max)
        )


# ------------------------------------------------------------- direct convolutions
def _per_group_patches(x, kernel, groups, stride, padding, dilation):  # type: ignore[no-untyped-def]
    """im2col rows of each group, (G, N*OH*OW, C_g*kh*kw), and the output size."""
    n = x.shape[0]
    xp = F.pad(x.double(), (padding, padding, padding, padding))
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride).round().long()
    h_out = (xp.shape[2] - dilation * (kernel[0] - 1) - 1) // stride + 1
    w_out = (xp.shape[3] - dilation * (kernel[1] - 1) - 1) // stride + 1
    cols = cols.view(n, groups, -1, h_out * w_out).permute(1, 0, 3, 2)
    return cols.reshape(groups, n * h_out * w_out, -1), (h_out, w_out)


def _fold(per_group: list[torch.Tensor], n: int, size: tuple[int, int]) -> torch.Tensor:
    """[(N*OH*OW, O_g)] per group -> (N, O, OH, OW)."""
    out = torch.cat([t.view(n, size[0] * size[1], -1) for t in per_group], 2)
    return out.permute(0, 2, 1).reshape(n, -1, *size)


DIRECT_CONVS = [
    dict(c=3, o=4, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(c=6, o=4, k=5, stride=2, padding=2, dilation=1, groups=2),
    dict(c=4, o=4, k=3, stride=1, padding=2, dilation=2, groups=4),
    dict(c=2, o=3, k=1, stride=1, padding=0, dilation=1, groups=1),
]


def _conv_args(g: dict) -> dict:
    return {
        "stride": (g["stride"],) * 2,
        "padding": (g["padding"],) * 2,
        "dilation": (g["dilation"],) * 2,
        "groups": g["groups"],
    }


@pytest.mark.parametrize("geometry", DIRECT_CONVS, ids=str)
@pytest.mark.parametrize("length", [16, 32, 64, 256])
def test_sc_conv2d_equals_sc_matmul_on_patches(geometry: dict, length: int) -> None:
    c, o, k, groups = geometry["c"], geometry["o"], geometry["k"], geometry["groups"]
    x = _rand(0, length, (2, c, 7, 6), 11)
    x[x < length // 2] = 0  # zero inputs take the kernel's skip path
    w_pos = _rand(0, length // 4, (o, c // groups, k, k), 12)
    w_neg = _rand(0, length // 4, (o, c // groups, k, k), 13)
    rules = {"phase_a": (1, 0), "phase_b": (3, 1)}
    out = cpu.sc_conv2d(x, w_pos, w_neg, length, **rules, **_conv_args(geometry))
    assert torch.equal(out.long(), _sc_on_patches(x, w_pos, w_neg, geometry, length, rules))


def _sc_on_patches(
    x: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor, geometry: dict, length: int,
    rules: dict,
) -> torch.Tensor:  # fmt: skip
    """The torch reference's ``sc_matmul`` on each group's im2col patches, as (N, O, OH, OW)
    counts of ones(pos) - ones(neg)."""
    k, groups = w_pos.shape[-1], geometry["groups"]
    rows, size = _per_group_patches(
        x, (k, k), groups, geometry["stride"], geometry["padding"], geometry["dilation"]
    )
    og = w_pos.shape[0] // groups
    diffs = []
    for g in range(groups):
        counts = torch_ref.sc_matmul(
            rows[g], w_pos[g * og : (g + 1) * og].reshape(og, -1),
            w_neg[g * og : (g + 1) * og].reshape(og, -1), length, **rules,
        )  # fmt: skip
        diffs.append(counts[..., 0] - counts[..., 1])
    return _fold(diffs, x.shape[0], size)


# Output widths around the blocks of pixels the direct kernels run together (8 for sc's paired
# kernel, 4 for analog's): 1, partial blocks, full ones, full and partial ones; strides,
# dilation and groups change which inputs a block reads.
ROW_BLOCK_CONVS = [
    dict(c=3, o=5, k=3, stride=1, padding=1, dilation=1, groups=1, width=1),
    dict(c=2, o=9, k=3, stride=1, padding=1, dilation=1, groups=1, width=7),
    dict(c=4, o=4, k=3, stride=1, padding=0, dilation=1, groups=2, width=10),
    dict(c=3, o=6, k=5, stride=2, padding=2, dilation=1, groups=3, width=35),
    dict(c=2, o=3, k=3, stride=1, padding=2, dilation=2, groups=1, width=19),
    # 16 to 31 outputs per group: analog's weights are widened with zeros to 32 (cpu.py)
    dict(c=3, o=20, k=3, stride=1, padding=1, dilation=1, groups=1, width=9),
    dict(c=4, o=34, k=3, stride=2, padding=1, dilation=1, groups=2, width=11),
]


def _sc_kernel_operands(
    geometry: dict, length: int, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> list:  # type: ignore[type-arg]
    """What ``cpu.sc_conv2d`` passes its kernel (its output array last), for ``x`` and random
    weights, recorded from a call."""
    from approxctl.backends import cpu_kernels

    c, o, k, groups = geometry["c"], geometry["o"], geometry["k"], geometry["groups"]
    w_pos = _rand(0, length, (o, c // groups, k, k), 22)
    w_neg = _rand(0, length, (o, c // groups, k, k), 23)
    w_pos[w_neg > w_pos] = 0  # a weight has one sign: one of its two streams is empty
    recorded: list = []  # type: ignore[type-arg]
    monkeypatch.setattr(
        cpu_kernels, "sc_conv2d_paired", lambda *operands: recorded.extend(operands)
    )
    cpu.sc_conv2d(x, w_pos, w_neg, length, phase_a=(1, 0), phase_b=(3, 1), **_conv_args(geometry))
    monkeypatch.undo()
    return recorded


@pytest.mark.parametrize("geometry", ROW_BLOCK_CONVS, ids=str)
@pytest.mark.parametrize("length", [16, 32])
@pytest.mark.parametrize("inputs", ["sparse", "zero", "full"])
def test_sc_conv2d_paired_equals_row_kernel(
    geometry: dict, length: int, inputs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel that runs two pixels per 64-bit word (streams of one 32-bit word) against the
    one that runs one pixel at a time, bit for bit: random inputs, half of them zero (the
    skipped reduction indices), all zero and all at L (every stream full)."""
    from approxctl.backends import cpu_kernels

    x = _rand(0, length, (2, geometry["c"], 5, geometry["width"]), 21)
    if inputs == "sparse":
        x[x < length // 2] = 0
    else:
        x.fill_(0 if inputs == "zero" else length)
    *operands, out = _sc_kernel_operands(geometry, length, x, monkeypatch)
    assert operands[2].dtype == np.uint32 and operands[2].shape[2] == 1  # one 32-bit word
    row, paired = np.empty_like(out), np.full_like(out, -999)
    cpu_kernels.sc_conv2d(*operands, row)
    cpu_kernels.sc_conv2d_paired(*operands, paired)
    np.testing.assert_array_equal(paired, row)
    if inputs == "sparse":  # the case compares counts, not zeros on both sides
        assert np.abs(row).max() > 0


@pytest.mark.parametrize("geometry", ROW_BLOCK_CONVS[3:5], ids=str)
def test_sc_conv2d_wide_rows_equal_sc_matmul_on_patches(geometry: dict) -> None:
    """``cpu.sc_conv2d`` on rows of full and partial blocks of the paired kernel, against the
    torch reference's ``sc_matmul`` on im2col patches."""
    c, o, k, groups = geometry["c"], geometry["o"], geometry["k"], geometry["groups"]
    length = 32
    x = _rand(0, length, (2, c, 6, geometry["width"]), 24)
    x[x < length // 3] = 0
    w_pos = _rand(0, length // 2, (o, c // groups, k, k), 25)
    w_neg = _rand(0, length // 2, (o, c // groups, k, k), 26)
    rules = {"phase_a": (1, 0), "phase_b": (3, 1)}
    out = cpu.sc_conv2d(x, w_pos, w_neg, length, **rules, **_conv_args(geometry))
    assert torch.equal(out.long(), _sc_on_patches(x, w_pos, w_neg, geometry, length, rules))


@pytest.mark.parametrize("geometry", DIRECT_CONVS, ids=str)
@pytest.mark.parametrize(("array_size", "adc_bits"), [(1, 4), (9, 4), (7, 8), (400, 16)])
def test_analog_conv2d_equals_analog_matmul_on_patches(
    geometry: dict, array_size: int, adc_bits: int
) -> None:
    c, o, k, groups = geometry["c"], geometry["o"], geometry["k"], geometry["groups"]
    x = _rand(0, 255, (2, c, 7, 6), 14)
    x[x < 100] = 0
    w = _rand(-127, 127, (o, c // groups, k, k), 15)
    adc_max = 20_000
    out = cpu.analog_conv2d(x, w, array_size, adc_bits, adc_max, **_conv_args(geometry))
    assert torch.equal(out, _analog_on_patches(x, w, geometry, array_size, adc_bits, adc_max))


def _analog_on_patches(
    x: torch.Tensor, w: torch.Tensor, geometry: dict, array_size: int, adc_bits: int,
    adc_max: int,
) -> torch.Tensor:  # fmt: skip
    """The torch reference's ``analog_matmul`` on each group's im2col patches, (N, O, OH, OW)."""
    k, groups = w.shape[-1], geometry["groups"]
    rows, size = _per_group_patches(
        x, (k, k), groups, geometry["stride"], geometry["padding"], geometry["dilation"]
    )
    og = w.shape[0] // groups
    parts = [
        torch_ref.analog_matmul(
            rows[g], w[g * og : (g + 1) * og].reshape(og, -1), array_size, adc_bits, adc_max
        )
        for g in range(groups)
    ]
    return _fold(parts, x.shape[0], size)


def test_analog_conv2d_kernel_gives_the_same_codes_with_int64_accumulators() -> None:
    """Arrays past 66,300 inputs accumulate in int64 (cpu.analog_conv2d): the kernel on int64
    operands against the same operands in int32, widened output groups included."""
    from approxctl.backends import cpu_kernels

    x = _rand(0, 255, (2, 6, 7, 9), 29).numpy().astype(np.int32)
    x[x < 120] = 0
    w = _rand(-127, 127, (2, 27, 20), 30).numpy().astype(np.int32)  # (G, K_g, O_g)
    w_pos = np.pad(np.maximum(w, 0), ((0, 0), (0, 0), (0, 12)))  # widened to 32, as cpu.py does
    w_neg = np.pad(np.maximum(-w, 0), ((0, 0), (0, 0), (0, 12)))
    geometry = np.array([3, 3, 1, 2, 1, 1, 2], dtype=np.int64)  # 3x3, stride (1, 2), groups 2
    outs = []
    for dtype in (np.int32, np.int64):
        out = np.empty((2, 40, 5, 4), dtype=np.int64)
        cpu_kernels.analog_conv2d(
            x.astype(dtype), w_pos.astype(dtype), w_neg.astype(dtype), 7, 15, 4000, geometry, out
        )
        outs.append(out)
    assert np.abs(outs[0]).max() > 0
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.parametrize("geometry", ROW_BLOCK_CONVS, ids=str)
@pytest.mark.parametrize(("array_size", "adc_bits"), [(9, 4), (7, 8), (8, 4)])
def test_analog_conv2d_row_blocks_equal_analog_matmul_on_patches(
    geometry: dict, array_size: int, adc_bits: int
) -> None:
    """Rows of full and partial pixel blocks; some blocks read only zeros in some arrays; last
    arrays shorter than the others (8 on K = 25 leaves one input)."""
    c, o, k, groups = geometry["c"], geometry["o"], geometry["k"], geometry["groups"]
    x = _rand(0, 255, (2, c, 6, geometry["width"]), 27)
    x[x < 140] = 0
    w = _rand(-127, 127, (o, c // groups, k, k), 28)
    adc_max = 9_000
    out = cpu.analog_conv2d(x, w, array_size, adc_bits, adc_max, **_conv_args(geometry))
    assert out.abs().max() > 0
    assert torch.equal(out, _analog_on_patches(x, w, geometry, array_size, adc_bits, adc_max))
