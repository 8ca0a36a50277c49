"""Independent check of ``approxctl.functional`` against SPEC section 3, bit for bit.

The three reference ops below are written straight from the SPEC text with plain Python integers,
one element and one stream bit at a time, so that they are obviously right; they share no code
with the package. Only the public functions ``approxctl.functional.{lut_matmul, sc_matmul,
analog_matmul}`` and ``approxctl.luts.load_lut`` are used from the package.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approxctl import functional as F

# The repository's copies of the EvoApprox tables, read with numpy (not the package's loader).
LUT_DIR = Path(__file__).resolve().parents[1] / "approxctl" / "luts"


@pytest.fixture(autouse=True, params=["torch", "cpu"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test against each CPU backend: the reference and the fast one."""
    from approxctl.backends import registry

    original = registry.get

    def pick(name: str, device: torch.device) -> object:
        # CUDA tensors keep "auto" (the GPU backend); the parameter picks the CPU backend.
        forced = name == "auto" and torch.device(device).type == "cpu"
        return original(request.param if forced else name, device)

    monkeypatch.setattr(registry, "get", pick)
    return request.param


LUT_NAMES = sorted(p.stem for p in LUT_DIR.glob("*.npy"))
EXACT_TABLES = ("mul7u_003", "mul8u_1JJQ", "mul8s_1KV6")
STREAM_LENGTHS = (16, 32, 64, 128, 256)

# SPEC 3.2: the maximal LFSR masks, n -> (mask A for activations, mask B for weights).
LFSR_MASKS = {
    4: (0b1100, 0b1001),
    5: (0b10100, 0b10010),
    6: (0b110000, 0b100001),
    7: (0b1100000, 0b1000001),
    8: (0b10111000, 0b10001110),
}

HYP = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------------------------
# Plain reference implementations (SPEC section 3)
# --------------------------------------------------------------------------------------------


def to_lists(x) -> list[list[int]]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [[int(v) for v in row] for row in x]


@functools.cache
def load_npy(name: str) -> np.ndarray:
    return np.load(LUT_DIR / f"{name}.npy")


def lut_tensor(name: str) -> torch.Tensor:
    return torch.from_numpy(load_npy(name).astype(np.int64))


def lut_size(name: str) -> int:
    return 128 if name.startswith("mul7u") else 256


def is_signed(name: str) -> bool:
    return name.startswith("mul8s")


def sign(v: int) -> int:
    return (v > 0) - (v < 0)


def ref_lut_matmul(a, b, lut, signed=False) -> list[list[int]]:
    """SPEC 3.1: sign-magnitude sum of lut[|a|, |b|], or lut[a+128, b+128] for signed tables."""
    a, b = to_lists(a), to_lists(b)
    table = lut.tolist() if isinstance(lut, (torch.Tensor, np.ndarray)) else lut
    out = []
    for a_row in a:
        out_row = []
        for b_row in b:
            total = 0
            for x, w in zip(a_row, b_row, strict=True):
                if signed:
                    total += int(table[x + 128][w + 128])
                else:
                    total += sign(x) * sign(w) * int(table[abs(x)][abs(w)])
            out_row.append(total)
        out.append(out_row)
    return out


def parity(x: int) -> int:
    return bin(x).count("1") % 2


def lfsr_cycle(n: int, mask: int) -> list[int]:
    """SPEC 3.2: C_X = [0, s_0, ..., s_{L-2}], the LFSR(n, mask) states from state 1."""
    length = 2**n
    cycle = [0]
    s = 1
    for _ in range(length - 1):
        cycle.append(s)
        s = ((s << 1) & (length - 1)) | parity(s & mask)
    return cycle


def cycles(length: int) -> tuple[list[int], list[int]]:
    n = length.bit_length() - 1
    mask_a, mask_b = LFSR_MASKS[n]
    return lfsr_cycle(n, mask_a), lfsr_cycle(n, mask_b)


def phase(k: int, length: int, rule: tuple[int, int]) -> int:
    alpha, beta = rule
    return (alpha * k + beta * (k // length)) % length


def stream(cycle: list[int], q: int, ph: int) -> list[int]:
    """SPEC 3.2: bit_t = 1 if C[(t + phase) mod L] < q else 0."""
    length = len(cycle)
    bits = []
    for t in range(length):
        bits.append(1 if cycle[(t + ph) % length] < q else 0)
    return bits


def ref_sc_matmul(a, b_pos, b_neg, length=32, phase_a=(1, 0), phase_b=(3, 1)):
    """SPEC 3.2: AND-multiply per k, OR-accumulate over k, popcount; (N, O, 2) nested lists."""
    a, b_pos, b_neg = to_lists(a), to_lists(b_pos), to_lists(b_neg)
    c_a, c_b = cycles(length)
    a_streams = [
        [stream(c_a, q, phase(k, length, phase_a)) for k, q in enumerate(row)] for row in a
    ]

    def weight_streams(rows):
        return [
            [stream(c_b, q, phase(k, length, phase_b)) for k, q in enumerate(row)] for row in rows
        ]

    pos_streams, neg_streams = weight_streams(b_pos), weight_streams(b_neg)
    out = []
    for a_row in a_streams:
        out_row = []
        for pos_row, neg_row in zip(pos_streams, neg_streams, strict=True):
            counts = []
            for w_row in (pos_row, neg_row):
                acc = [0] * length
                for x_bits, w_bits in zip(a_row, w_row, strict=True):
                    for t in range(length):
                        acc[t] = acc[t] | (x_bits[t] & w_bits[t])
                counts.append(sum(acc))
            out_row.append(counts)
        out.append(out_row)
    return out


def adc_code(p: int, adc_bits: int, adc_max: int) -> int:
    top = 2**adc_bits - 1
    q = (2 * p * top + adc_max) // (2 * adc_max)
    return min(max(q, 0), top)


def ref_analog_matmul(a, b, array_size, adc_bits, adc_max) -> list[list[int]]:
    """SPEC 3.3: per chunk of array_size along K and per sign, ADC(sum a*b^s); sum q+ - q-."""
    a, b = to_lists(a), to_lists(b)
    out = []
    for a_row in a:
        out_row = []
        for b_row in b:
            total = 0
            for start in range(0, len(a_row), array_size):
                p_pos = 0
                p_neg = 0
                for k in range(start, min(start + array_size, len(a_row))):
                    p_pos += a_row[k] * max(b_row[k], 0)
                    p_neg += a_row[k] * max(-b_row[k], 0)
                total += adc_code(p_pos, adc_bits, adc_max) - adc_code(p_neg, adc_bits, adc_max)
            out_row.append(total)
        out.append(out_row)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64)


def check_result(got: torch.Tensor, expected, shape) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.int64, got.dtype
    assert tuple(got.shape) == tuple(shape), (tuple(got.shape), shape)
    got_list = got.cpu().tolist()
    if got_list != expected:
        diff = [
            (idx, e, g)
            for idx, (e, g) in enumerate(
                zip(np.asarray(expected).ravel().tolist(), got.cpu().ravel().tolist(), strict=True)
            )
            if e != g
        ]
        raise AssertionError(
            f"{len(diff)} mismatches (flat index, expected, got), first ones: {diff[:8]}"
        )


def run_lut(a, b, name_or_lut, signed=None):
    if isinstance(name_or_lut, str):
        lut = lut_tensor(name_or_lut)
        signed = is_signed(name_or_lut) if signed is None else signed
    else:
        lut = name_or_lut
        signed = bool(signed)
    got = F.lut_matmul(t64(a), t64(b), lut, signed=signed)
    expected = ref_lut_matmul(a, b, lut, signed=signed)
    check_result(got, expected, (len(a), len(b)))
    return got


def run_sc(a, b_pos, b_neg, length, phase_a=None, phase_b=None):
    kwargs = {}
    if phase_a is not None:
        kwargs["phase_a"] = phase_a
    if phase_b is not None:
        kwargs["phase_b"] = phase_b
    got = F.sc_matmul(t64(a), t64(b_pos), t64(b_neg), length=length, **kwargs)
    expected = ref_sc_matmul(
        a, b_pos, b_neg, length, phase_a=phase_a or (1, 0), phase_b=phase_b or (3, 1)
    )
    check_result(got, expected, (len(a), len(b_pos), 2))
    return got


def run_analog(a, b, array_size, adc_bits, adc_max):
    got = F.analog_matmul(t64(a), t64(b), array_size, adc_bits, adc_max)
    expected = ref_analog_matmul(a, b, array_size, adc_bits, adc_max)
    check_result(got, expected, (len(a), len(b)))
    return got


def rand_matrix(rng, rows, cols, lo, hi) -> list[list[int]]:
    return rng.integers(lo, hi + 1, size=(rows, cols)).tolist()


def int_matrix(draw, rows: int, cols: int, lo: int, hi: int) -> list[list[int]]:
    row = st.lists(st.integers(lo, hi), min_size=cols, max_size=cols)
    return draw(st.lists(row, min_size=rows, max_size=rows))


def lut_range(name: str) -> tuple[int, int]:
    if is_signed(name):
        return -128, 127
    m = lut_size(name)
    return -(m - 1), m - 1


# --------------------------------------------------------------------------------------------
# Reference self-checks (these validate the reference against claims SPEC makes about it)
# --------------------------------------------------------------------------------------------


def test_lut_files_present():
    assert len(LUT_NAMES) == 26
    for name in EXACT_TABLES:
        assert name in LUT_NAMES


@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_reference_cycle_is_permutation_and_lfsr_is_maximal(length):
    n = length.bit_length() - 1
    for mask in LFSR_MASKS[n]:
        cycle = lfsr_cycle(n, mask)
        assert cycle[0] == 0 and cycle[1] == 1
        assert sorted(cycle) == list(range(length))
        # maximal: after L-1 steps from state 1 the register is back at state 1
        s = cycle[-1]
        assert ((s << 1) & (length - 1)) | parity(s & mask) == 1


@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_reference_stream_has_q_ones(length):
    c_a, c_b = cycles(length)
    for cycle in (c_a, c_b):
        for q in range(length + 1):
            for ph in (0, 1, length // 2 + 1, length - 1):
                assert sum(stream(cycle, q, ph)) == q


def test_reference_exact_tables_are_exact():
    for name in EXACT_TABLES:
        lut = load_npy(name).astype(np.int64)
        v = np.arange(-128, 128) if is_signed(name) else np.arange(lut_size(name))
        assert np.array_equal(lut, np.multiply.outer(v, v))


# --------------------------------------------------------------------------------------------
# lut_matmul (SPEC 3.1)
# --------------------------------------------------------------------------------------------


@st.composite
def lut_cases(draw):
    name = draw(st.sampled_from(LUT_NAMES))
    n, o, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    lo, hi = lut_range(name)
    return name, int_matrix(draw, n, k, lo, hi), int_matrix(draw, o, k, lo, hi)


@HYP
@given(lut_cases())
def test_lut_matmul_matches_reference_random(case):
    name, a, b = case
    run_lut(a, b, name)


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul7u_0FV", "mul8u_L93", "mul8u_17C8"])
def test_lut_matmul_unsigned_tables_seeded(name):
    rng = np.random.default_rng(1)
    lo, hi = lut_range(name)
    run_lut(rand_matrix(rng, 5, 37, lo, hi), rand_matrix(rng, 6, 37, lo, hi), name)


@pytest.mark.parametrize("name", ["mul8s_1KV8", "mul8s_1L2J", "mul8s_1KVP"])
def test_lut_matmul_signed_tables_seeded(name):
    rng = np.random.default_rng(2)
    run_lut(rand_matrix(rng, 5, 37, -128, 127), rand_matrix(rng, 6, 37, -128, 127), name)


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul8u_2V0", "mul8s_1L2N"])
def test_lut_matmul_all_zeros(name):
    got = run_lut([[0] * 7] * 3, [[0] * 7] * 2, name)
    assert not got.any() or is_signed(name)


@pytest.mark.parametrize("name", LUT_NAMES)
def test_lut_matmul_extreme_values(name):
    lo, hi = lut_range(name)
    # every combination of the extremes (and +-1, 0) in one K vector
    vals = [lo, hi, 0, 1, -1]
    a = [[x for x in vals for _ in vals], [hi] * 25, [lo] * 25]
    b = [[w for _ in vals for w in vals], [hi] * 25, [lo] * 25]
    run_lut(a, b, name)


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul8u_DG8", "mul8s_1KV9"])
def test_lut_matmul_k_equals_one(name):
    lo, hi = lut_range(name)
    a = [[lo], [hi], [0], [3]]
    b = [[hi], [lo], [5]]
    run_lut(a, b, name)


@pytest.mark.parametrize("name", EXACT_TABLES)
def test_lut_matmul_exact_tables_give_matmul(name):
    rng = np.random.default_rng(3)
    lo, hi = lut_range(name)
    a = t64(rand_matrix(rng, 6, 50, lo, hi))
    b = t64(rand_matrix(rng, 5, 50, lo, hi))
    a[0, :] = lo
    b[0, :] = hi
    b[1, :] = lo
    got = F.lut_matmul(a, b, lut_tensor(name), signed=is_signed(name))
    assert got.dtype == torch.int64
    assert torch.equal(got, a @ b.T)


def test_lut_matmul_row_is_activation():
    # SPEC 3.1: "The LUT row index is the activation, the column index the weight".
    lut = load_npy("mul7u_09Y").astype(np.int64)
    rows, cols = np.nonzero(lut != lut.T)
    x, w = int(rows[0]), int(cols[0])
    got = F.lut_matmul(t64([[x]]), t64([[w]]), lut_tensor("mul7u_09Y"))
    assert got.tolist() == [[int(lut[x, w])]] != [[int(lut[w, x])]]


def test_lut_matmul_synthetic_asymmetric_tables():
    # distinct entries make any indexing mistake (transpose, off-by-one, offset) visible
    idx = np.arange(128)
    lut7 = torch.from_numpy(idx[:, None] * 1000 + idx[None, :] + 7)
    rng = np.random.default_rng(4)
    run_lut(rand_matrix(rng, 4, 19, -127, 127), rand_matrix(rng, 3, 19, -127, 127), lut7, False)
    lut8s = torch.from_numpy(rng.integers(-30000, 30000, size=(256, 256)))
    run_lut(rand_matrix(rng, 4, 19, -128, 127), rand_matrix(rng, 3, 19, -128, 127), lut8s, True)


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul8u_18UH"])
def test_lut_matmul_unsigned_sign_magnitude_symmetry(name):
    rng = np.random.default_rng(5)
    lo, hi = lut_range(name)
    a = t64(rand_matrix(rng, 4, 21, lo, hi))
    b = t64(rand_matrix(rng, 3, 21, lo, hi))
    lut = lut_tensor(name)
    base = F.lut_matmul(a, b, lut)
    assert torch.equal(F.lut_matmul(-a, b, lut), -base)
    assert torch.equal(F.lut_matmul(a, -b, lut), -base)
    assert torch.equal(F.lut_matmul(-a, -b, lut), base)


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul8s_1KV8"])
def test_lut_matmul_split_n_and_o(name):
    rng = np.random.default_rng(6)
    lo, hi = lut_range(name)
    a = t64(rand_matrix(rng, 7, 13, lo, hi))
    b = t64(rand_matrix(rng, 5, 13, lo, hi))
    lut, signed = lut_tensor(name), is_signed(name)
    full = F.lut_matmul(a, b, lut, signed=signed)
    halves = torch.cat(
        [F.lut_matmul(a[:3], b, lut, signed=signed), F.lut_matmul(a[3:], b, lut, signed=signed)],
        dim=0,
    )
    assert torch.equal(full, halves)
    cols = torch.cat(
        [F.lut_matmul(a, b[:2], lut, signed=signed), F.lut_matmul(a, b[2:], lut, signed=signed)],
        dim=1,
    )
    assert torch.equal(full, cols)
    check_result(full, ref_lut_matmul(a, b, lut, signed), (7, 5))


def test_lut_matmul_small_integer_dtypes():
    rng = np.random.default_rng(7)
    a = rand_matrix(rng, 3, 9, -127, 127)
    b = rand_matrix(rng, 4, 9, -127, 127)
    expected = ref_lut_matmul(a, b, lut_tensor("mul7u_09Y"))
    for dtype in (torch.int8, torch.int16, torch.int32):
        got = F.lut_matmul(
            torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype), lut_tensor("mul7u_09Y")
        )
        check_result(got, expected, (3, 4))
    a8 = rand_matrix(rng, 3, 9, -255, 255)
    b8 = rand_matrix(rng, 4, 9, -255, 255)
    got = F.lut_matmul(
        torch.tensor(a8, dtype=torch.int16),
        torch.tensor(b8, dtype=torch.int32),
        lut_tensor("mul8u_1A0M"),
    )
    check_result(got, ref_lut_matmul(a8, b8, lut_tensor("mul8u_1A0M")), (3, 4))
    # the table itself in a narrower integer dtype
    got = F.lut_matmul(t64(a8), t64(b8), lut_tensor("mul8u_1A0M").to(torch.int32))
    check_result(got, ref_lut_matmul(a8, b8, lut_tensor("mul8u_1A0M")), (3, 4))
    s_a = rand_matrix(rng, 3, 9, -128, 127)
    s_b = rand_matrix(rng, 4, 9, -128, 127)
    got = F.lut_matmul(
        torch.tensor(s_a, dtype=torch.int8),
        torch.tensor(s_b, dtype=torch.int8),
        torch.from_numpy(load_npy("mul8s_1L12")),
        signed=True,
    )
    check_result(got, ref_lut_matmul(s_a, s_b, lut_tensor("mul8s_1L12"), True), (3, 4))


def test_lut_matmul_sum_exceeds_int32():
    # SPEC 3.1: "exact int64 sum"; 255 * 255 * 40000 > 2^31
    k = 40000
    a = torch.full((2, k), 255, dtype=torch.int64)
    a[1] = -255
    b = torch.full((1, k), 255, dtype=torch.int64)
    got = F.lut_matmul(a, b, lut_tensor("mul8u_1JJQ"))
    assert got.dtype == torch.int64
    assert got.tolist() == [[255 * 255 * k], [-255 * 255 * k]]


# --------------------------------------------------------------------------------------------
# load_lut
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LUT_NAMES)
def test_load_lut_matches_npy(name):
    from approxctl.luts import load_lut

    got = load_lut(name)
    expected = load_npy(name)
    assert isinstance(got, torch.Tensor)
    assert not got.is_floating_point() and got.dtype != torch.bool
    assert tuple(got.shape) == expected.shape
    assert torch.equal(got.to(torch.int64), torch.from_numpy(expected.astype(np.int64)))


def test_load_lut_usable_in_lut_matmul():
    from approxctl.luts import load_lut

    rng = np.random.default_rng(8)
    a = rand_matrix(rng, 3, 11, -127, 127)
    b = rand_matrix(rng, 2, 11, -127, 127)
    got = F.lut_matmul(t64(a), t64(b), load_lut("mul7u_09Y"))
    check_result(got, ref_lut_matmul(a, b, lut_tensor("mul7u_09Y")), (3, 2))


# --------------------------------------------------------------------------------------------
# sc_matmul (SPEC 3.2)
# --------------------------------------------------------------------------------------------


@st.composite
def sc_cases(draw):
    length = draw(st.sampled_from(STREAM_LENGTHS))
    n, o = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, min(40, 2 * length + 3)))
    a = int_matrix(draw, n, k, 0, length)
    b_pos = int_matrix(draw, o, k, 0, length)
    b_neg = int_matrix(draw, o, k, 0, length)
    return length, a, b_pos, b_neg


@HYP
@given(sc_cases())
def test_sc_matmul_matches_reference_random(case):
    length, a, b_pos, b_neg = case
    got = run_sc(a, b_pos, b_neg, length)
    assert int(got.min()) >= 0 and int(got.max()) <= length


@st.composite
def sc_phase_cases(draw):
    length, a, b_pos, b_neg = draw(sc_cases())
    rule = st.tuples(st.integers(0, length - 1), st.integers(0, length - 1))
    return length, a, b_pos, b_neg, draw(rule), draw(rule)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc_phase_cases())
def test_sc_matmul_matches_reference_random_phases(case):
    length, a, b_pos, b_neg, phase_a, phase_b = case
    run_sc(a, b_pos, b_neg, length, phase_a=phase_a, phase_b=phase_b)


def test_sc_matmul_default_length_is_32():
    rng = np.random.default_rng(9)
    a = rand_matrix(rng, 2, 40, 0, 32)
    b_pos = rand_matrix(rng, 3, 40, 0, 32)
    b_neg = rand_matrix(rng, 3, 40, 0, 32)
    got = F.sc_matmul(t64(a), t64(b_pos), t64(b_neg))
    check_result(got, ref_sc_matmul(a, b_pos, b_neg, 32), (2, 3, 2))


@pytest.mark.parametrize("length", STREAM_LENGTHS)
@pytest.mark.parametrize("k_kind", ["one", "below_L", "2L+3"])
def test_sc_matmul_every_length_seeded(length, k_kind):
    k = {"one": 1, "below_L": length // 2 + 3, "2L+3": 2 * length + 3}[k_kind]
    rng = np.random.default_rng(length * 7 + k)
    # small probabilities so that the OR does not saturate and every bit matters
    hi = max(1, length // 16)
    a = rand_matrix(rng, 2, k, 0, length)
    b_pos = rand_matrix(rng, 2, k, 0, hi)
    b_neg = rand_matrix(rng, 2, k, 0, hi)
    b_pos[1] = rand_matrix(rng, 1, k, 0, length)[0]
    got = run_sc(a, b_pos, b_neg, length)
    assert int(got.min()) >= 0 and int(got.max()) <= length


@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_sc_matmul_all_zeros_and_all_max(length):
    k = 2 * length + 3
    zeros = [[0] * k] * 2
    full = [[length] * k] * 2
    got = run_sc(zeros, full, full, length)
    assert not got.any()
    got = run_sc(full, zeros, zeros, length)
    assert not got.any()
    got = run_sc(full, full, full, length)
    assert bool((got == length).all())
    got = run_sc(full, full, zeros, length)
    assert got[..., 0].eq(length).all() and not got[..., 1].any()


@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_sc_matmul_stream_of_q_holds_q_ones(length):
    # K = 1: an all-ones stream (value L) ANDed with the stream of q has exactly q ones.
    qs = list(range(length + 1))
    a = [[q] for q in qs]
    full = [[length]]
    got = F.sc_matmul(t64(a), t64(full), t64([[0]]), length=length)
    assert got[:, 0, 0].tolist() == qs and not got[:, 0, 1].any()
    got = F.sc_matmul(t64(full), t64(a), t64(a[::-1]), length=length)
    assert got[0, :, 0].tolist() == qs and got[0, :, 1].tolist() == qs[::-1]
    # the same at a reduction index with non-zero phases (k = L + 5)
    k = length + 5
    a_k = [[0] * (k - 1) + [q] for q in qs]
    full_k = [[0] * (k - 1) + [length]]
    got = F.sc_matmul(t64(a_k), t64(full_k), t64(full_k), length=length)
    assert got[:, 0, 0].tolist() == qs and got[:, 0, 1].tolist() == qs


@pytest.mark.parametrize("length", STREAM_LENGTHS)
def test_sc_matmul_k1_pairs_exhaustive_for_some_values(length):
    # K = 1, both phases 0: count of t with C_A[t] < a and C_B[t] < b.
    vals = sorted({0, 1, 2, 3, length // 4, length // 2, length // 2 + 1, length - 1, length})
    a = [[v] for v in vals]
    run_sc(a, a, a[::-1], length)


@pytest.mark.parametrize("length", [16, 32, 64])
def test_sc_matmul_non_default_phase_pairs(length):
    rng = np.random.default_rng(10 + length)
    k = 2 * length + 3
    a = rand_matrix(rng, 2, k, 0, length)
    b_pos = rand_matrix(rng, 3, k, 0, 1)
    b_neg = rand_matrix(rng, 3, k, 0, 2)
    for phase_a, phase_b in [
        ((5, 2), (7, 3)),
        ((0, 1), (1, 0)),
        ((1, 0), (1, 0)),
        ((3, 1), (1, 0)),
        ((2, 0), (0, 0)),
    ]:
        run_sc(a, b_pos, b_neg, length, phase_a=phase_a, phase_b=phase_b)
    # the phase options must matter: find a case where the reference changes with the phases
    z1 = [[0] * 5]
    for _ in range(100):
        a1 = rand_matrix(rng, 1, 5, 0, length // 2)
        w1 = rand_matrix(rng, 1, 5, 0, length // 2)
        defaults = ref_sc_matmul(a1, w1, z1, length)
        swapped = ref_sc_matmul(a1, w1, z1, length, phase_a=(3, 1), phase_b=(1, 0))
        if defaults != swapped:
            break
    assert defaults != swapped
    got_def = F.sc_matmul(t64(a1), t64(w1), t64(z1), length=length)
    got_swp = F.sc_matmul(t64(a1), t64(w1), t64(z1), length=length, phase_a=(3, 1), phase_b=(1, 0))
    assert got_def.tolist() == defaults and got_swp.tolist() == swapped


def test_sc_matmul_explicit_default_phases_equal_defaults():
    rng = np.random.default_rng(11)
    a = t64(rand_matrix(rng, 2, 70, 0, 32))
    b_pos = t64(rand_matrix(rng, 2, 70, 0, 2))
    b_neg = t64(rand_matrix(rng, 2, 70, 0, 2))
    implicit = F.sc_matmul(a, b_pos, b_neg, length=32)
    explicit = F.sc_matmul(a, b_pos, b_neg, length=32, phase_a=(1, 0), phase_b=(3, 1))
    assert torch.equal(implicit, explicit)


@settings(max_examples=30, deadline=None)
@given(sc_cases(), st.data())
def test_sc_matmul_bounds_and_monotonicity(case, data):
    length, a, b_pos, b_neg = case
    got = F.sc_matmul(t64(a), t64(b_pos), t64(b_neg), length=length).tolist()
    for n, a_row in enumerate(a):
        for o in range(len(b_pos)):
            for s, w_row in enumerate((b_pos[o], b_neg[o])):
                c = got[n][o][s]
                # OR of ANDs: at most sum_k min(a_k, w_k) ones, at least max_k (a_k + w_k - L)
                upper = min(length, sum(min(x, w) for x, w in zip(a_row, w_row, strict=True)))
                lower = max(0, *(x + w - length for x, w in zip(a_row, w_row, strict=True)))
                assert lower <= c <= upper
    # raising one activation value never removes ones (stream of q is inside stream of q+1)
    n = data.draw(st.integers(0, len(a) - 1))
    k = data.draw(st.integers(0, len(a[0]) - 1))
    if a[n][k] < length:
        bigger = [row[:] for row in a]
        bigger[n][k] += 1
        got2 = F.sc_matmul(t64(bigger), t64(b_pos), t64(b_neg), length=length)
        assert bool((got2 >= t64(got)).all())


@pytest.mark.parametrize("length", [32, 128])
def test_sc_matmul_split_n_and_o(length):
    rng = np.random.default_rng(12)
    k = length + 9
    a = t64(rand_matrix(rng, 5, k, 0, length))
    b_pos = t64(rand_matrix(rng, 4, k, 0, 2))
    b_neg = t64(rand_matrix(rng, 4, k, 0, 2))
    full = F.sc_matmul(a, b_pos, b_neg, length=length)
    halves = torch.cat(
        [
            F.sc_matmul(a[:2], b_pos, b_neg, length=length),
            F.sc_matmul(a[2:], b_pos, b_neg, length=length),
        ],
        dim=0,
    )
    assert torch.equal(full, halves)
    cols = torch.cat(
        [
            F.sc_matmul(a, b_pos[:1], b_neg[:1], length=length),
            F.sc_matmul(a, b_pos[1:], b_neg[1:], length=length),
        ],
        dim=1,
    )
    assert torch.equal(full, cols)
    check_result(full, ref_sc_matmul(a, b_pos, b_neg, length), (5, 4, 2))


def test_sc_matmul_small_integer_dtypes():
    rng = np.random.default_rng(13)
    a = rand_matrix(rng, 2, 20, 0, 32)
    b_pos = rand_matrix(rng, 3, 20, 0, 4)
    b_neg = rand_matrix(rng, 3, 20, 0, 4)
    expected = ref_sc_matmul(a, b_pos, b_neg, 32)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        got = F.sc_matmul(
            torch.tensor(a, dtype=dtype),
            torch.tensor(b_pos, dtype=dtype),
            torch.tensor(b_neg, dtype=dtype),
            length=32,
        )
        check_result(got, expected, (2, 3, 2))
    a256 = rand_matrix(rng, 2, 20, 0, 256)
    b256 = rand_matrix(rng, 3, 20, 0, 256)
    got = F.sc_matmul(
        torch.tensor(a256, dtype=torch.int16),
        torch.tensor(b256, dtype=torch.int16),
        torch.tensor(b256, dtype=torch.int32),
        length=256,
    )
    check_result(got, ref_sc_matmul(a256, b256, b256, 256), (2, 3, 2))


# --------------------------------------------------------------------------------------------
# analog_matmul (SPEC 3.3)
# --------------------------------------------------------------------------------------------


@st.composite
def analog_cases(draw):
    n, o, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 30))
    array_size = draw(st.integers(1, 12))
    adc_bits = draw(st.integers(1, 10))
    adc_max = draw(st.one_of(st.integers(1, 300), st.integers(1, 255 * 127 * array_size)))
    a = int_matrix(draw, n, k, 0, 255)
    b = int_matrix(draw, o, k, -127, 127)
    return a, b, array_size, adc_bits, adc_max


@settings(max_examples=80, deadline=None)
@given(analog_cases())
def test_analog_matmul_matches_reference_random(case):
    a, b, array_size, adc_bits, adc_max = case
    run_analog(a, b, array_size, adc_bits, adc_max)


@pytest.mark.parametrize(
    ("k", "array_size"),
    [(1, 9), (1, 1), (9, 9), (10, 9), (25, 9), (26, 25), (70, 64), (64, 64), (5, 64), (13, 1)],
)
def test_analog_matmul_chunking_seeded(k, array_size):
    rng = np.random.default_rng(k * 100 + array_size)
    a = rand_matrix(rng, 3, k, 0, 255)
    b = rand_matrix(rng, 4, k, -127, 127)
    for adc_bits, adc_max in [
        (4, 255 * 127 * min(k, array_size) // 3 + 1),
        (4, 5000),
        (1, 700),
        (8, 12345),
        (6, 1),
    ]:
        run_analog(a, b, array_size, adc_bits, adc_max)


def test_analog_matmul_round_half_up_ties():
    # p * (2^b - 1) / adc_max exactly x.5 must round up: p = 1, bits = 1, adc_max = 2 -> 0.5 -> 1
    got = F.analog_matmul(t64([[1]]), t64([[1], [-1]]), 1, 1, 2)
    assert got.tolist() == [[1, -1]] == ref_analog_matmul([[1]], [[1], [-1]], 1, 1, 2)
    # 3 * 15 / 10 = 4.5 -> 5 ; 1 * 15 / 10 = 1.5 -> 2 ; 1 * 15 / 6 = 2.5 -> 3
    run_analog([[3, 1]], [[1, 0], [0, 1], [1, 1], [-1, -1]], 1, 4, 10)
    assert ref_analog_matmul([[3]], [[1]], 1, 4, 10) == [[5]]
    run_analog([[1]], [[1], [-1]], 1, 4, 6)


@pytest.mark.parametrize("array_size", [1, 9, 64])
def test_analog_matmul_all_zeros_and_all_max(array_size):
    k = 2 * array_size + 3 if array_size > 1 else 7
    zeros_a = [[0] * k] * 2
    max_a = [[255] * k] * 2
    b = [[127] * k, [-127] * k, [0] * k]
    got = run_analog(zeros_a, b, array_size, 4, 1000)
    assert not got.any()
    got = run_analog(max_a, [[0] * k], array_size, 4, 1000)
    assert not got.any()
    n_chunks = -(-k // array_size)
    # adc_max = 1: every non-zero chunk saturates at 2^bits - 1
    got = run_analog(max_a, b, array_size, 4, 1)
    assert got.tolist() == [[15 * n_chunks, -15 * n_chunks, 0]] * 2
    run_analog(max_a, b, array_size, 8, 255 * 127 * array_size)
    run_analog(max_a, b, array_size, 3, 255 * 127 * array_size * 2 + 1)


@st.composite
def unclamped_analog_cases(draw):
    # 16 ADC bits (the package caps adc_bits at 16; SPEC 3.3 is silent on a cap) and
    # adc_max = scale * (2^16 - 1); array_size is kept small enough that a chunk's partial sum
    # (at most 255 * 127 * array_size) never reaches the clamp: p / scale <= 2^16 - 1.
    scale = draw(st.sampled_from([1, 2, 3, 7, 1000]))
    max_array = min(12, scale * (2**16 - 1) // (255 * 127))
    n, o, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 30))
    array_size = draw(st.integers(1, max_array))
    a = int_matrix(draw, n, k, 0, 255)
    b = int_matrix(draw, o, k, -127, 127)
    return a, b, array_size, scale


@settings(max_examples=40, deadline=None)
@given(unclamped_analog_cases())
def test_analog_matmul_high_resolution_is_scaled_rounding(case):
    # without clamping q = round_half_up(p / scale) per chunk and sign, so the result is
    # a @ b.T / scale up to 1/2 per chunk and sign; scale 1 gives the exact integer product.
    a, b, array_size, scale = case
    adc_bits = 16
    adc_max = scale * (2**adc_bits - 1)
    got = F.analog_matmul(t64(a), t64(b), array_size, adc_bits, adc_max)
    exact = t64(a) @ t64(b).T
    n_chunks = -(-len(a[0]) // array_size)
    if scale == 1:
        assert torch.equal(got, exact)
    else:
        assert bool(((got * scale - exact).abs() <= n_chunks * scale).all())
    check_result(got, ref_analog_matmul(a, b, array_size, adc_bits, adc_max), exact.shape)


@settings(max_examples=30, deadline=None)
@given(analog_cases())
def test_analog_matmul_negating_weights_negates_result(case):
    a, b, array_size, adc_bits, adc_max = case
    got = F.analog_matmul(t64(a), t64(b), array_size, adc_bits, adc_max)
    neg = F.analog_matmul(t64(a), -t64(b), array_size, adc_bits, adc_max)
    assert torch.equal(neg, -got)
    assert bool((got.abs() <= (2**adc_bits - 1) * -(-len(a[0]) // array_size)).all())


def test_analog_matmul_no_int32_overflow():
    # 2 * p * (2^bits - 1) exceeds 2^31 here; SPEC 3.3 asks for exact integer arithmetic
    a = [[255] * 64, [255] * 63 + [254]]
    b = [[127] * 64, [-127] * 64]
    p = 255 * 127 * 64
    for adc_bits, adc_max in [(16, p), (16, 3 * p), (12, 7), (16, p + 1)]:
        run_analog(a, b, 64, adc_bits, adc_max)
    got = F.analog_matmul(t64(a), t64(b), 64, 16, p)
    assert got[0].tolist() == [65535, -65535]


def test_analog_matmul_split_n_and_o():
    rng = np.random.default_rng(14)
    a = t64(rand_matrix(rng, 7, 30, 0, 255))
    b = t64(rand_matrix(rng, 5, 30, -127, 127))
    args = (9, 4, 40000)
    full = F.analog_matmul(a, b, *args)
    halves = torch.cat([F.analog_matmul(a[:3], b, *args), F.analog_matmul(a[3:], b, *args)])
    assert torch.equal(full, halves)
    cols = torch.cat([F.analog_matmul(a, b[:2], *args), F.analog_matmul(a, b[2:], *args)], dim=1)
    assert torch.equal(full, cols)
    check_result(full, ref_analog_matmul(a, b, *args), (7, 5))


def test_analog_matmul_keyword_arguments_and_small_dtypes():
    rng = np.random.default_rng(15)
    a = rand_matrix(rng, 3, 20, 0, 255)
    b = rand_matrix(rng, 2, 20, -127, 127)
    expected = ref_analog_matmul(a, b, 9, 4, 30000)
    got = F.analog_matmul(t64(a), t64(b), array_size=9, adc_bits=4, adc_max=30000)
    check_result(got, expected, (3, 2))
    got = F.analog_matmul(
        torch.tensor(a, dtype=torch.uint8), torch.tensor(b, dtype=torch.int8), 9, 4, 30000
    )
    check_result(got, expected, (3, 2))
    got = F.analog_matmul(
        torch.tensor(a, dtype=torch.int16), torch.tensor(b, dtype=torch.int32), 9, 4, 30000
    )
    check_result(got, expected, (3, 2))


# --------------------------------------------------------------------------------------------
# Invalid inputs: out of range or float dtype -> ValueError (or a subclass)
# --------------------------------------------------------------------------------------------


def _lut(name):
    return lut_tensor(name)


BAD_CALLS = [
    # lut_matmul, unsigned 7-bit: |a|, |b| < 128
    ("lut7_a_128", lambda: F.lut_matmul(t64([[128]]), t64([[1]]), _lut("mul7u_09Y"))),
    ("lut7_a_-128", lambda: F.lut_matmul(t64([[-128]]), t64([[1]]), _lut("mul7u_09Y"))),
    ("lut7_b_128", lambda: F.lut_matmul(t64([[1]]), t64([[128]]), _lut("mul7u_09Y"))),
    ("lut7_b_-200", lambda: F.lut_matmul(t64([[1, 2]]), t64([[3, -200]]), _lut("mul7u_003"))),
    ("lut8u_a_256", lambda: F.lut_matmul(t64([[256]]), t64([[1]]), _lut("mul8u_1JJQ"))),
    ("lut8u_b_-256", lambda: F.lut_matmul(t64([[1]]), t64([[-256]]), _lut("mul8u_1JJQ"))),
    # lut_matmul, signed 8-bit: a, b in [-128, 127]
    (
        "lut8s_a_128",
        lambda: F.lut_matmul(t64([[128]]), t64([[1]]), _lut("mul8s_1KV6"), signed=True),
    ),
    (
        "lut8s_a_-129",
        lambda: F.lut_matmul(t64([[-129]]), t64([[1]]), _lut("mul8s_1KV6"), signed=True),
    ),
    (
        "lut8s_b_128",
        lambda: F.lut_matmul(t64([[0]]), t64([[128]]), _lut("mul8s_1KV6"), signed=True),
    ),
    # lut_matmul float inputs
    ("lut_a_float", lambda: F.lut_matmul(torch.tensor([[1.0]]), t64([[1]]), _lut("mul7u_09Y"))),
    ("lut_b_float", lambda: F.lut_matmul(t64([[1]]), torch.tensor([[1.0]]), _lut("mul7u_09Y"))),
    (
        "lut_a_float64_signed",
        lambda: F.lut_matmul(
            torch.tensor([[1.0]], dtype=torch.float64), t64([[1]]), _lut("mul8s_1KV6"), signed=True
        ),
    ),
    # sc_matmul: everything in [0, L]
    ("sc_a_L+1", lambda: F.sc_matmul(t64([[33]]), t64([[1]]), t64([[1]]), length=32)),
    ("sc_a_-1", lambda: F.sc_matmul(t64([[-1]]), t64([[1]]), t64([[1]]), length=32)),
    ("sc_bpos_L+1", lambda: F.sc_matmul(t64([[1]]), t64([[17]]), t64([[1]]), length=16)),
    ("sc_bpos_-1", lambda: F.sc_matmul(t64([[1]]), t64([[-1]]), t64([[1]]), length=16)),
    ("sc_bneg_L+1", lambda: F.sc_matmul(t64([[1, 1]]), t64([[1, 1]]), t64([[0, 65]]), length=64)),
    ("sc_bneg_-1", lambda: F.sc_matmul(t64([[1]]), t64([[1]]), t64([[-1]]), length=32)),
    ("sc_default_length_a_33", lambda: F.sc_matmul(t64([[33]]), t64([[1]]), t64([[1]]))),
    ("sc_a_float", lambda: F.sc_matmul(torch.tensor([[1.0]]), t64([[1]]), t64([[1]]))),
    ("sc_bpos_float", lambda: F.sc_matmul(t64([[1]]), torch.tensor([[1.0]]), t64([[1]]))),
    ("sc_bneg_float", lambda: F.sc_matmul(t64([[1]]), t64([[1]]), torch.tensor([[0.0]]))),
    ("sc_length_48", lambda: F.sc_matmul(t64([[1]]), t64([[1]]), t64([[1]]), length=48)),
    # analog_matmul: a in [0, 255], b in [-127, 127], adc_max > 0
    ("analog_a_256", lambda: F.analog_matmul(t64([[256]]), t64([[1]]), 9, 4, 100)),
    ("analog_a_-1", lambda: F.analog_matmul(t64([[-1]]), t64([[1]]), 9, 4, 100)),
    ("analog_b_128", lambda: F.analog_matmul(t64([[1]]), t64([[128]]), 9, 4, 100)),
    ("analog_b_-128", lambda: F.analog_matmul(t64([[1, 1]]), t64([[0, -128]]), 9, 4, 100)),
    ("analog_a_float", lambda: F.analog_matmul(torch.tensor([[1.0]]), t64([[1]]), 9, 4, 100)),
    ("analog_b_float", lambda: F.analog_matmul(t64([[1]]), torch.tensor([[1.0]]), 9, 4, 100)),
    ("analog_adc_max_0", lambda: F.analog_matmul(t64([[1]]), t64([[1]]), 9, 4, 0)),
    ("analog_adc_max_-5", lambda: F.analog_matmul(t64([[1]]), t64([[1]]), 9, 4, -5)),
]


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in BAD_CALLS])
def test_invalid_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_lut_float_table_raises_value_error():
    # SPEC 3.1: `lut` is an (M, M) *integer* tensor
    with pytest.raises(ValueError):
        F.lut_matmul(t64([[1]]), t64([[1]]), lut_tensor("mul7u_09Y").to(torch.float32))


# --------------------------------------------------------------------------------------------
# CUDA (SPEC 3: bit-exact on CPU and CUDA); deselected by default via the `gpu` marker
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    rng = np.random.default_rng(16)
    dev = torch.device("cuda")
    for name in ("mul7u_09Y", "mul8u_L93", "mul8s_1KV8"):
        lo, hi = lut_range(name)
        a = rand_matrix(rng, 5, 40, lo, hi)
        b = rand_matrix(rng, 6, 40, lo, hi)
        got = F.lut_matmul(
            t64(a).to(dev), t64(b).to(dev), lut_tensor(name).to(dev), signed=is_signed(name)
        )
        check_result(got, ref_lut_matmul(a, b, lut_tensor(name), is_signed(name)), (5, 6))
    for length in STREAM_LENGTHS:
        k = 2 * length + 3
        a = rand_matrix(rng, 2, k, 0, length)
        b_pos = rand_matrix(rng, 3, k, 0, 2)
        b_neg = rand_matrix(rng, 3, k, 0, 2)
        got = F.sc_matmul(t64(a).to(dev), t64(b_pos).to(dev), t64(b_neg).to(dev), length=length)
        check_result(got, ref_sc_matmul(a, b_pos, b_neg, length), (2, 3, 2))
        got = F.sc_matmul(
            t64(a).to(dev),
            t64(b_pos).to(dev),
            t64(b_neg).to(dev),
            length=length,
            phase_a=(5, 2),
            phase_b=(7, 3),
        )
        check_result(got, ref_sc_matmul(a, b_pos, b_neg, length, (5, 2), (7, 3)), (2, 3, 2))
    a = rand_matrix(rng, 4, 70, 0, 255)
    b = rand_matrix(rng, 5, 70, -127, 127)
    for array_size, adc_bits, adc_max in [(9, 4, 30000), (64, 6, 500000), (25, 1, 3)]:
        got = F.analog_matmul(t64(a).to(dev), t64(b).to(dev), array_size, adc_bits, adc_max)
        check_result(got, ref_analog_matmul(a, b, array_size, adc_bits, adc_max), (4, 5))
