"""The CUDA kernels' own source, run on the CPU, against the reference backend bit for bit.

approxctl/kernels/*.cu are compiled with g++ against tests/cuda_emulation.h (threads of a block
are std::threads meeting at a barrier in __syncthreads(), shared memory is shared statics) and
launched with the exact launch plans the CuPy backend uses (approxctl/backends/cuda_kernels.py).
This checks the kernels' index arithmetic, tiling, table layouts and integer semantics, and the
host-side planning, without a GPU; tests/test_cupy_backend.py repeats the comparison on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from approxctl import streams
from approxctl.backends import cuda_kernels, torch_ref
from approxctl.luts import load_lut
from approxctl.noise import NoiseSpec

HEADER = Path(__file__).resolve().parent / "cuda_emulation.h"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++ (C++20) to emulate the kernels")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    build = tmp_path_factory.mktemp("cuda_emulation")
    lines = [f'#include "{HEADER}"']
    lines += [f'#include "{path}"' for path in cuda_kernels.source_files()]
    lines.append(
        'extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, '
        "unsigned threads, unsigned long shared_mem, void** params) {"
    )
    lines.append("    if (shared_mem > sizeof(lut_smem)) return -2;")
    for names in cuda_kernels.KERNELS.values():
        for name in names:
            lines.append(
                f'    if (std::strcmp(name, "{name}") == 0) '
                f"return emu_run({name}, gx, gy, gz, threads, params);"
            )
    lines += ["    return -1;", "}"]
    (build / "harness.cpp").write_text("\n".join(lines) + "\n")
    library = build / "libemu.so"
    result = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra",
         "-Wno-unused-parameter", "harness.cpp", "-o", str(library)],
        cwd=build, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        if "barrier" in result.stderr and "No such file" in result.stderr:
            pytest.skip("g++ lacks C++20 <barrier>")
        pytest.fail(f"the kernels do not build for the CPU emulation:\n{result.stderr}")
    lib = ctypes.CDLL(str(library))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p),
    ]  # fmt: skip
    return lib


def _run(lib: ctypes.CDLL, launch: cuda_kernels.Launch) -> None:
    holders: list[ctypes._SimpleCData] = []
    for arg in launch.args:
        if isinstance(arg, torch.Tensor):
            assert arg.device.type == "cpu" and arg.is_contiguous()
            holders.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, np.int32):
            holders.append(ctypes.c_int32(int(arg)))
        elif isinstance(arg, np.int64):
            holders.append(ctypes.c_int64(int(arg)))
        elif isinstance(arg, np.float32):
            holders.append(ctypes.c_float(float(arg)))
        else:
            raise TypeError(f"unexpected launch argument {arg!r}")
    params = (ctypes.c_void_p * len(holders))(
        *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders]
    )
    assert launch.block == (cuda_kernels.THREADS, 1, 1)
    status = lib.emu_launch(
        launch.kernel.encode(), *launch.grid, launch.block[0], launch.shared_mem, params
    )
    assert status == 0, f"emu_launch({launch.kernel}) returned {status}"


def _rand(lo: int, hi: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ LUT
def _lut_case(lib, a, b, lut, signed, shared_limit):
    launch, out = cuda_kernels.plan_lut_matmul(a, b, lut, signed, dynamic_shared_limit=shared_limit)
    _run(lib, launch)
    return launch.kernel, out


@pytest.mark.parametrize("name", ["mul7u_09Y", "mul8u_17MJ", "mul8s_1KV9"])
def test_lut_kernels_match_reference(emulator: ctypes.CDLL, name: str) -> None:
    signed = name.startswith("mul8s")
    lut = load_lut(name)
    lo, hi = (-128, 127) if signed else (-(lut.shape[0] - 1), lut.shape[0] - 1)
    # 70 x 67 outputs: two tiles each way with ragged edges; K = 37 ends mid K-tile.
    a, b = _rand(lo, hi, (70, 37), 1), _rand(lo, hi, (67, 37), 2)
    expected = torch_ref.lut_matmul(a, b, lut, signed)
    for limit in (1 << 20, 0):  # the table in shared memory, then read from global memory
        kernel, got = _lut_case(emulator, a, b, lut, signed, limit)
        assert kernel.endswith("shared" if limit else "global")
        assert torch.equal(got, expected), kernel
    # Edge cases: all operands at the extreme, K = 1, all zeros.
    for a_e, b_e in [
        (torch.full((3, 40), hi), torch.full((2, 40), lo if signed else hi)),
        (torch.full((3, 40), lo), torch.full((2, 40), lo)),
        (a[:, :1], b[:, :1]),
        (torch.zeros(5, 20, dtype=torch.int64), torch.zeros(4, 20, dtype=torch.int64)),
    ]:
        _, got = _lut_case(emulator, a_e, b_e, lut, signed, 1 << 20)
        assert torch.equal(got, torch_ref.lut_matmul(a_e, b_e, lut, signed))


@pytest.mark.parametrize("signed", [False, True])
def test_lut_kernels_wide_and_odd_tables(emulator: ctypes.CDLL, signed: bool) -> None:
    """Tables beyond 16 bits (int32 path, wrapping like the reference), negative entries in an
    unsigned table, and lut[0, x] != 0 (which must not count for a zero unsigned operand)."""
    rng = np.random.default_rng(5)
    size = 256 if signed else 128
    lo, hi = (-128, 127) if signed else (-(size - 1), size - 1)
    a, b = _rand(lo, hi, (33, 50), 3), _rand(lo, hi, (65, 50), 4)
    a[0, :5] = 0
    b[1, :7] = 0
    tables = {
        "i32": torch.from_numpy(rng.integers(-(1 << 31), 1 << 31, (size, size))),
        "u16": torch.from_numpy(rng.integers(0, 1 << 16, (size, size))),
        "i16": torch.from_numpy(rng.integers(-(1 << 15), 1 << 15, (size, size))),
        "wrap": torch.from_numpy(rng.integers(-(1 << 40), 1 << 40, (size, size))),
    }
    for kind, lut in tables.items():
        expected = torch_ref.lut_matmul(a, b, lut, signed)
        kernel, got = _lut_case(emulator, a, b, lut, signed, 1 << 20)
        assert kernel.split("_")[2] == ("i32" if kind == "wrap" else kind)
        assert torch.equal(got, expected), kernel


# ------------------------------------------------------------------------------------- SC
@pytest.mark.parametrize("length", streams.STREAM_LENGTHS)
def test_sc_kernel_matches_reference(emulator: ctypes.CDLL, length: int) -> None:
    k = length + 21  # K > L: the weight phase rule's floor(k / L) term is exercised
    a = _rand(0, length, (66, k), length)
    b_pos, b_neg = _rand(0, length, (65, k), 1), _rand(0, length // 4, (65, k), 2)
    for rules in [(streams.DEFAULT_PHASE_A, streams.DEFAULT_PHASE_B), ((5, 2), (7, 3))]:
        launch, got = cuda_kernels.plan_sc_matmul(a, b_pos, b_neg, length, *rules)
        _run(emulator, launch)
        expected = torch_ref.sc_matmul(a, b_pos, b_neg, length, phase_a=rules[0], phase_b=rules[1])
        assert torch.equal(got, expected), (length, rules)


def test_sc_kernel_edge_cases(emulator: ctypes.CDLL) -> None:
    for length in (16, 256):
        cases = [
            (torch.full((2, 9), length), torch.full((3, 9), length), torch.zeros(3, 9)),
            (torch.zeros(2, 9), torch.full((3, 9), length), torch.full((3, 9), length)),
            (_rand(0, length, (4, 1), 7), _rand(0, length, (3, 1), 8), _rand(0, 3, (3, 1), 9)),
        ]
        for a, p, n in cases:
            a, p, n = a.long(), p.long(), n.long()
            launch, got = cuda_kernels.plan_sc_matmul(
                a, p, n, length, streams.DEFAULT_PHASE_A, streams.DEFAULT_PHASE_B
            )
            _run(emulator, launch)
            assert torch.equal(got, torch_ref.sc_matmul(a, p, n, length))


# --------------------------------------------------------------------------------- analog
@pytest.mark.parametrize(
    ("array_size", "adc_bits", "adc_max"),
    [(9, 4, 30000), (16, 4, 50000), (25, 1, 3), (64, 6, 500000), (7, 16, 123457),
     (200, 8, 10**9), (70000, 4, 2**39)],
)  # fmt: skip
def test_analog_kernel_matches_reference(
    emulator: ctypes.CDLL, array_size: int, adc_bits: int, adc_max: int
) -> None:
    # K = 70: several K-tiles, arrays that straddle tiles, and a shorter last array.
    a, b = _rand(0, 255, (67, 70), array_size), _rand(-127, 127, (66, 70), adc_bits)
    expected = torch_ref.analog_matmul(a, b, array_size, adc_bits, adc_max)
    for wide in (None, True):  # int32 partial sums (chosen for these sizes), then int64
        launch, got = cuda_kernels.plan_analog_matmul(
            a, b, array_size, adc_bits, adc_max, wide_accumulator=wide
        )
        _run(emulator, launch)
        assert launch.kernel.endswith("acc64" if wide else "acc32")
        assert torch.equal(got, expected), launch.kernel


def test_analog_kernel_edge_cases(emulator: ctypes.CDLL) -> None:
    cases = [
        (torch.full((3, 64), 255), torch.full((2, 64), 127)),
        (torch.full((3, 64), 255), torch.full((2, 64), -127)),
        (torch.zeros(3, 64, dtype=torch.int64), _rand(-127, 127, (2, 64), 1)),
        (_rand(0, 255, (3, 1), 2), _rand(-127, 127, (2, 1), 3)),
    ]
    for a, b in cases:
        for array_size, adc_bits, adc_max in [(9, 4, 1000), (64, 4, 255 * 127 * 64), (1, 2, 1)]:
            launch, got = cuda_kernels.plan_analog_matmul(a, b, array_size, adc_bits, adc_max)
            _run(emulator, launch)
            assert torch.equal(got, torch_ref.analog_matmul(a, b, array_size, adc_bits, adc_max))


def test_packed_streams_follow_the_stream_definition() -> None:
    for length in streams.STREAM_LENGTHS:
        for which in ("a", "b"):
            table = cuda_kernels.packed_streams(length, which)
            c = streams.cycle(length, which).numpy()
            for phase in (0, 1, length - 1):
                for value in (0, 1, length // 3, length):
                    bits = [
                        (int(table[phase, value, t // 32]) >> (t % 32)) & 1 for t in range(length)
                    ]
                    expected = [int(c[(t + phase) % length] < value) for t in range(length)]
                    assert bits == expected


# ------------------------------------------------------------------------------ pointwise
# References for kernels/pointwise.cu in numpy float32, one IEEE operation at a time: a fused
# multiply-add is the float64 product (exact for float32 operands) plus the addend, rounded.
_F32 = np.float32


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + c).astype(np.float32)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    mask = np.uint64(0xFFFFFFFF)
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & mask
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & mask
    x ^= x >> np.uint64(16)
    return x


def _ref_error(v: np.ndarray, noise: cuda_kernels.NoiseArgs) -> np.ndarray:
    p, m = noise.params.numpy(), noise.m
    lo, hi = p[0], p[1]
    t = (np.minimum(np.maximum(v, lo), hi) - _F32(0.5) * (lo + hi)) * (_F32(2.0) / (hi - lo))

    def horner(coef: np.ndarray) -> np.ndarray:
        acc = np.full_like(t, coef[-1])
        for c in coef[-2::-1]:
            acc = _fma(acc, t, c)
        return acc

    mu = np.minimum(np.maximum(horner(p[5 : 5 + m]), p[2]), p[3])
    sigma = np.minimum(np.maximum(horner(p[5 + m : 5 + 2 * m]), _F32(0.0)), p[4])
    index = np.arange(v.size, dtype=np.uint64)  # below 2^32: the salt is the key
    hashes = _lowbias32((index ^ np.uint64(noise.key)) & np.uint64(0xFFFFFFFF))
    eps = noise.table.numpy()[(hashes >> np.uint64(noise.shift)).astype(np.int64)]
    return _fma(sigma, eps, mu)


def _ref_exp_neg(z: np.ndarray) -> np.ndarray:
    z = np.minimum(np.maximum(z, _F32(0.0)), _F32(87.0))
    k = np.floor(_fma(z, _F32(1.44269504), _F32(0.5)))
    r = _fma(k, _F32(2.12194440e-4), _fma(-k, _F32(0.693359375), z))
    p = np.full_like(z, _F32(-1.0 / 5040.0))
    for c in (1 / 720, -1 / 120, 1 / 24, -1 / 6, 0.5, -1.0, 1.0):
        p = _fma(p, r, _F32(c))
    return np.ldexp(p, -k.astype(np.int32)).astype(np.float32)


def _spec(degree: int, seed: int) -> NoiseSpec:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(degree + 1, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(degree + 1, generator=g, dtype=torch.float64) * 0.2 + 0.05
    return NoiseSpec(mu, sigma, -1.5, 2.5, mu_min=-0.3, mu_max=0.25, sigma_max=0.4)


def _per_channel(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


CHANNELS, INNER = 3, 37  # segments of 37 elements, channels cycling through a 5-sample batch
SCALE, BIAS = _per_channel([0.5, 1.25, 3.0]), _per_channel([0.1, -0.2, 0.0])


def _channel_of(n: int) -> np.ndarray:
    return (np.arange(n) // INNER) % CHANNELS


@pytest.mark.parametrize("degree", [0, 10])
def test_add_error_kernel_matches_reference(emulator: ctypes.CDLL, degree: int) -> None:
    torch.manual_seed(4)
    y = torch.randn(5, CHANNELS, INNER) * 2
    noise = cuda_kernels.noise_args(_spec(degree, degree), y.device)
    out = torch.empty_like(y)
    _run(emulator, cuda_kernels.plan_add_error(y, out, SCALE, BIAS, CHANNELS, INNER, noise))
    c = _channel_of(y.numel())
    s, b, yv = SCALE.numpy()[c], BIAS.numpy()[c], y.numpy().reshape(-1)
    v = (yv - b) * (_F32(1.0) / s)
    expected = _fma(_ref_error(v, noise), s, yv)
    assert np.array_equal(out.numpy().reshape(-1), expected)
    same = y.clone()  # in place: out is y
    _run(emulator, cuda_kernels.plan_add_error(same, same, SCALE, BIAS, CHANNELS, INNER, noise))
    assert torch.equal(same, out)


def test_error_draw_is_a_standard_normal_sample(emulator: ctypes.CDLL) -> None:
    """mu = 0, sigma = 1: the error is the quantile the hash picks, over many elements."""
    y = torch.zeros(1 << 16)
    spec = NoiseSpec(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), -1, 1)
    torch.manual_seed(5)
    noise = cuda_kernels.noise_args(spec, y.device)
    one, zero = _per_channel([1.0]), _per_channel([0.0])
    _run(emulator, cuda_kernels.plan_add_error(y, y, one, zero, 1, 1, noise))
    e = y.double()
    assert abs(float(e.mean())) < 0.02 and float(e.std()) == pytest.approx(1.0, abs=0.02)
    assert len(torch.unique(y)) > 3500  # most of the 4096 quantiles are drawn


@pytest.mark.parametrize("noisy", [False, True])
def test_sc_proxy_kernels_match_reference(emulator: ctypes.CDLL, noisy: bool) -> None:
    torch.manual_seed(6)
    z_pos, z_neg = torch.rand(5, CHANNELS, INNER) * 6, torch.rand(5, CHANNELS, INNER) * 6
    z_pos.view(-1)[:4] = torch.tensor([0.0, -0.5, 80.0, 1e-7])  # clamped below, far tail, tiny
    noise = cuda_kernels.noise_args(_spec(10, 3) if noisy else None, z_pos.device)
    launch, out, e_pos, e_neg = cuda_kernels.plan_sc_proxy_forward(
        z_pos, z_neg, SCALE, BIAS, CHANNELS, INNER, noise
    )
    _run(emulator, launch)
    c = _channel_of(z_pos.numel())
    a, b = _ref_exp_neg(z_pos.numpy().reshape(-1)), _ref_exp_neg(z_neg.numpy().reshape(-1))
    v = b - a
    if noisy:
        v = v + _ref_error(v, noise)
    assert np.array_equal(e_pos.numpy().reshape(-1), a)
    assert np.array_equal(e_neg.numpy().reshape(-1), b)
    assert np.array_equal(out.numpy().reshape(-1), _fma(v, SCALE.numpy()[c], BIAS.numpy()[c]))
    # the kernels' exp(-z) against float64's
    z = z_pos.numpy().reshape(-1).astype(np.float64)
    rel = np.abs(a - np.exp(-np.maximum(z, 0))) / np.exp(-np.maximum(z, 0))
    assert rel.max() < 1.5e-7

    grad = torch.randn(5, CHANNELS, INNER)
    launch, g_pos, g_neg = cuda_kernels.plan_sc_proxy_backward(
        grad, e_pos, e_neg, SCALE, CHANNELS, INNER
    )
    _run(emulator, launch)
    gs = grad.numpy().reshape(-1) * SCALE.numpy()[c]
    assert np.array_equal(g_pos.numpy().reshape(-1), gs * a)
    assert np.array_equal(g_neg.numpy().reshape(-1), -(gs * b))


@pytest.mark.parametrize(("terms", "noisy"), [(2, False), (2, True), (4, True)])
def test_hardtanh_proxy_kernels_match_reference(
    emulator: ctypes.CDLL, terms: int, noisy: bool
) -> None:
    torch.manual_seed(7)
    limit = 2.0
    zs = tuple(torch.rand(5, CHANNELS, INNER) * 3 - 0.5 for _ in range(terms))
    for z in zs:  # the clamps' edges: exactly 0 and exactly T are inside
        z.view(-1)[:3] = torch.tensor([0.0, limit, -0.0])
    noise = cuda_kernels.noise_args(_spec(0, 1) if noisy else None, zs[0].device)
    launch, out, inside = cuda_kernels.plan_hardtanh_proxy_forward(
        zs, limit, SCALE, BIAS, CHANNELS, INNER, noise
    )
    _run(emulator, launch)
    flat = [z.numpy().reshape(-1) for z in zs]
    clamped = [np.minimum(np.maximum(z, _F32(0.0)), _F32(limit)) for z in flat]
    v = clamped[0] - clamped[1]
    if terms == 4:
        v = v + (clamped[3] - clamped[2])
    code = sum(((z >= 0) & (z <= limit)).astype(np.uint8) << j for j, z in enumerate(flat))
    if noisy:
        v = v + _ref_error(v, noise)
    c = _channel_of(v.size)
    assert np.array_equal(inside.numpy().reshape(-1), code)
    assert np.array_equal(out.numpy().reshape(-1), _fma(v, SCALE.numpy()[c], BIAS.numpy()[c]))

    grad = torch.randn(5, CHANNELS, INNER)
    launch, grads = cuda_kernels.plan_hardtanh_proxy_backward(
        grad, inside, SCALE, CHANNELS, INNER, terms
    )
    _run(emulator, launch)
    gs = grad.numpy().reshape(-1) * SCALE.numpy()[c]
    for j, (g, sign) in enumerate(zip(grads, (1, -1, -1, 1), strict=False)):
        expected = np.where(code & (1 << j), sign * gs, _F32(0.0)).astype(np.float32)
        assert np.array_equal(g.numpy().reshape(-1), expected), j
