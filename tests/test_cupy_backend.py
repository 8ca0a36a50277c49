"""The CuPy backend on a GPU against the torch reference, bit for bit (SPEC section 7).

Marked ``gpu`` (deselected by default; ``make test-gpu`` runs them) and skipped without a CUDA
device or CuPy. The same kernels also run on the CPU, emulated, in test_kernels_emulated.py.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import approxctl
from approxctl import functional as F
from approxctl import streams
from approxctl.backends import cuda_kernels, registry, torch_ref
from approxctl.layers import approx_layers
from approxctl.luts import bundled_luts, load_lut

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cupy_backend = pytest.importorskip("approxctl.backends.cupy_backend", reason="needs cupy")

DEV = torch.device("cuda")
LUT_NAMES = sorted(bundled_luts())


def _rand(lo: int, hi: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


def _assert_same(got: torch.Tensor, expected_cuda: torch.Tensor, expected_cpu: torch.Tensor):
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert torch.equal(got, expected_cuda)
    assert torch.equal(got.cpu(), expected_cpu)


# ------------------------------------------------------------------------------ selection
def test_auto_uses_cupy_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.get("auto", DEV) is cupy_backend
    assert registry.get("cupy", DEV) is cupy_backend
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.get("auto", DEV) is torch_ref
    assert registry.get("cupy", DEV) is cupy_backend  # an explicit name beats the environment


# ------------------------------------------------------------------------------------ LUT
SHAPES = [(1, 1, 1), (1, 5, 1), (70, 37, 67), (64, 16, 64), (5, 300, 3), (130, 1001, 70)]


@pytest.mark.parametrize("name", LUT_NAMES)
def test_lut_matmul_every_table(name: str) -> None:
    signed = name.startswith("mul8s")
    lut = load_lut(name)
    lut_cuda = lut.to(DEV)
    lo, hi = (-128, 127) if signed else (-(lut.shape[0] - 1), lut.shape[0] - 1)
    cases = [(_rand(lo, hi, (n, k), n + k), _rand(lo, hi, (o, k), o * k)) for n, k, o in SHAPES]
    cases += [
        (torch.full((3, 700), hi), torch.full((2, 700), hi)),  # all max
        (torch.full((3, 700), lo), torch.full((2, 700), hi)),
        (torch.full((3, 700), lo), torch.full((2, 700), lo)),
        (torch.zeros(4, 33, dtype=torch.int64), torch.zeros(5, 33, dtype=torch.int64)),
        (torch.zeros(4, 33, dtype=torch.int64), _rand(lo, hi, (5, 33), 1)),
    ]
    for a, b in cases:
        expected_cpu = torch_ref.lut_matmul(a, b, lut, signed)
        a_d, b_d = a.to(DEV), b.to(DEV)
        got = F.lut_matmul(a_d, b_d, lut_cuda, signed, backend="cupy")
        _assert_same(got, torch_ref.lut_matmul(a_d, b_d, lut_cuda, signed), expected_cpu)
        # The other table placement (global memory) gives the same result.
        launch, out = cuda_kernels.plan_lut_matmul(
            a_d, b_d, lut_cuda, signed, dynamic_shared_limit=0
        )
        assert launch.kernel.endswith("_global")
        cupy_backend.run(launch, DEV.index or 0)
        assert torch.equal(out.cpu(), expected_cpu)


@pytest.mark.parametrize("signed", [False, True])
def test_lut_matmul_wide_and_odd_tables(signed: bool) -> None:
    """int32 entries (wrapping like the reference), 16-bit signed/unsigned entries, and tables
    whose row/column 0 is not zero."""
    rng = np.random.default_rng(3)
    size = 256 if signed else 128
    lo, hi = (-128, 127) if signed else (-(size - 1), size - 1)
    a, b = _rand(lo, hi, (97, 300), 1), _rand(lo, hi, (45, 300), 2)
    a[:3, :20] = 0
    b[:2, 10:40] = 0
    bounds = [(-(1 << 31), 1 << 31), (0, 1 << 16), (-(1 << 15), 1 << 15), (-(1 << 40), 1 << 40)]
    for lo_v, hi_v in bounds:
        lut = torch.from_numpy(rng.integers(lo_v, hi_v, (size, size)))
        expected_cpu = torch_ref.lut_matmul(a, b, lut, signed)
        got = F.lut_matmul(a.to(DEV), b.to(DEV), lut.to(DEV), signed, backend="cupy")
        assert torch.equal(got.cpu(), expected_cpu), (lo_v, hi_v)


def test_lut_matmul_any_integer_dtype_and_layout() -> None:
    lut = load_lut("mul7u_09Y").to(DEV)
    a = _rand(-127, 127, (40, 90), 5).to(DEV)
    b = _rand(-127, 127, (90, 30), 6).to(DEV).T  # a non-contiguous view
    expected = torch_ref.lut_matmul(a, b, lut)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        got = F.lut_matmul(a.to(dtype), b.to(dtype), lut, backend="cupy")
        assert torch.equal(got, expected), dtype


def test_lut_table_modified_in_place_is_reprepared() -> None:
    lut = load_lut("mul7u_09Y").to(DEV)
    a, b = _rand(-127, 127, (9, 20), 1).to(DEV), _rand(-127, 127, (7, 20), 2).to(DEV)
    first = F.lut_matmul(a, b, lut, backend="cupy")
    assert torch.equal(first, torch_ref.lut_matmul(a, b, lut))
    lut.mul_(2)
    assert torch.equal(F.lut_matmul(a, b, lut, backend="cupy"), 2 * first)


# ------------------------------------------------------------------------------------- SC
PHASES = [
    (streams.DEFAULT_PHASE_A, streams.DEFAULT_PHASE_B),
    ((5, 2), (7, 3)),
    ((0, 0), (0, 0)),
    ((1, 1), (2, 0)),
]


@pytest.mark.parametrize("length", streams.STREAM_LENGTHS)
def test_sc_matmul_every_length_and_phase_rule(length: int) -> None:
    ks = [1, length - 1, length, length + 1, 3 * length + 5, 800]
    for (pa, pb), k in itertools.product(PHASES, ks):
        a = _rand(0, length, (67, k), k)
        b_pos = _rand(0, length, (66, k), k + 1)
        b_neg = _rand(0, max(1, length // 8), (66, k), k + 2)  # sparse: the OR stays informative
        expected_cpu = torch_ref.sc_matmul(a, b_pos, b_neg, length, phase_a=pa, phase_b=pb)
        a_d, p_d, n_d = a.to(DEV), b_pos.to(DEV), b_neg.to(DEV)
        got = F.sc_matmul(a_d, p_d, n_d, length, phase_a=pa, phase_b=pb, backend="cupy")
        expected_cuda = torch_ref.sc_matmul(a_d, p_d, n_d, length, phase_a=pa, phase_b=pb)
        _assert_same(got, expected_cuda, expected_cpu)


@pytest.mark.parametrize("length", streams.STREAM_LENGTHS)
def test_sc_matmul_edge_values(length: int) -> None:
    zeros, full = torch.zeros(5, 40, dtype=torch.int64), torch.full((5, 40), length)
    rand = _rand(0, length, (5, 40), length)
    cases = [
        (zeros, full, full), (full, full, zeros), (full, rand, full), (rand, zeros, zeros),
        (rand[:, :1], full[:, :1], rand[:, :1]),  # K = 1
    ]  # fmt: skip
    for a, b_pos, b_neg in cases:
        expected_cpu = torch_ref.sc_matmul(a, b_pos, b_neg, length)
        got = F.sc_matmul(a.to(DEV), b_pos.to(DEV), b_neg.to(DEV), length, backend="cupy")
        assert torch.equal(got.cpu(), expected_cpu)


# --------------------------------------------------------------------------------- analog
ANALOG_PARAMS = [
    (1, 4, 100), (9, 4, 30000), (25, 4, 255 * 127 * 25), (64, 6, 500000), (64, 16, 123457),
    (100, 8, 10**6), (7, 1, 1), (3, 2, 2**39), (9, 4, 2**45), (5000, 4, 10**7),
]  # fmt: skip


@pytest.mark.parametrize(("array_size", "adc_bits", "adc_max"), ANALOG_PARAMS)
def test_analog_matmul_random(array_size: int, adc_bits: int, adc_max: int) -> None:
    for n, k, o in [(1, 1, 1), (70, 37, 67), (5, 500, 130), (64, 64, 64)]:
        a, b = _rand(0, 255, (n, k), k), _rand(-127, 127, (o, k), o)
        expected_cpu = torch_ref.analog_matmul(a, b, array_size, adc_bits, adc_max)
        a_d, b_d = a.to(DEV), b.to(DEV)
        got = F.analog_matmul(a_d, b_d, array_size, adc_bits, adc_max, backend="cupy")
        expected_cuda = torch_ref.analog_matmul(a_d, b_d, array_size, adc_bits, adc_max)
        _assert_same(got, expected_cuda, expected_cpu)


def test_analog_matmul_edges_and_wide_accumulator() -> None:
    cases = [
        (torch.full((3, 100), 255), torch.full((4, 100), 127)),
        (torch.full((3, 100), 255), torch.full((4, 100), -127)),
        (torch.zeros(3, 100, dtype=torch.int64), _rand(-127, 127, (4, 100), 1)),
        (_rand(0, 255, (3, 100), 2), torch.zeros(4, 100, dtype=torch.int64)),
    ]
    for (a, b), (size, bits, adc_max) in itertools.product(cases, ANALOG_PARAMS[:7]):
        expected = torch_ref.analog_matmul(a, b, size, bits, adc_max)
        got = F.analog_matmul(a.to(DEV), b.to(DEV), size, bits, adc_max, backend="cupy")
        assert torch.equal(got.cpu(), expected)
        for wide in (False, True):
            launch, out = cuda_kernels.plan_analog_matmul(
                a.to(DEV), b.to(DEV), size, bits, adc_max, wide_accumulator=wide
            )
            cupy_backend.run(launch, DEV.index or 0)
            assert torch.equal(out.cpu(), expected)
    # Partial sums beyond int32: arrays of 70,000 products at the maximum.
    a, b = torch.full((2, 70001), 255), torch.full((3, 70001), 127)
    expected = torch_ref.analog_matmul(a, b, 70000, 8, 2**31)
    assert torch.equal(F.analog_matmul(a.to(DEV), b.to(DEV), 70000, 8, 2**31).cpu(), expected)


def test_runs_on_the_current_torch_stream() -> None:
    lut = load_lut("mul7u_09Y").to(DEV)
    a, b = _rand(-127, 127, (500, 300), 1).to(DEV), _rand(-127, 127, (200, 300), 2).to(DEV)
    expected = torch_ref.lut_matmul(a, b, lut)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = F.lut_matmul(a, b, lut, backend="cupy")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------- layers
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 10),
    )


TARGET_OPTIONS = [
    ("sc", {}), ("sc", {"length": 16}), ("sc", {"length": 256, "phase_b": (5, 2)}),
    ("am", {}), ("am", {"lut": "mul8s_1KV9"}), ("am", {"lut": "mul8u_L93"}),
    ("analog", {}), ("analog", {"array_size": 7, "adc_bits": 6}),
]  # fmt: skip


@pytest.mark.parametrize(("target", "options"), TARGET_OPTIONS)
def test_layers_on_cuda_equal_layers_on_cpu(target: str, options: dict) -> None:
    x = torch.randn(4, 3, 10, 10)  # signed input: the first layer takes the split path
    model = approxctl.convert(_model(), target, example_inputs=x, **options)
    approxctl.calibrate(model, [x])
    approxctl.set_mode(model, "exact")
    gpu_model = copy.deepcopy(model).to(DEV)
    # Each approximate layer's exact integer emulation, on the same quantized operands.
    cpu_layers = dict(approx_layers(model))
    gpu_layers = dict(approx_layers(gpu_model))
    assert cpu_layers
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        return lambda _module, args: inputs.__setitem__(name, args[0])

    hooks = [layer.register_forward_pre_hook(keep_input(n)) for n, layer in cpu_layers.items()]
    with torch.no_grad():
        out_cpu = model(x)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, layer in cpu_layers.items():
            q = layer.target.quantize(layer, inputs[name])
            q_gpu = {key: value.to(DEV) for key, value in q.items()}
            gpu_layer = gpu_layers[name]
            exact_cpu = layer.target.exact(layer, q)
            exact_gpu = gpu_layer.target.exact(gpu_layer, q_gpu)
            assert torch.equal(exact_gpu.cpu(), exact_cpu), name
        out_gpu = gpu_model(x.to(DEV))
    # End to end, float work around the emulation (scales, bias, ReLU) may round differently.
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)


@pytest.mark.parametrize(("target", "options"), TARGET_OPTIONS[::3])
def test_inject_mode_on_cuda_trains_and_draws_like_the_cpu(target: str, options: dict) -> None:
    """Inject mode on CUDA (the pointwise CUDA kernels) against the CPU's fused kernels: the
    same proxy up to float rounding, and injected errors with the same mean and spread."""
    x = torch.randn(64, 3, 10, 10)
    model = approxctl.convert(_model(), target, example_inputs=x, **options)
    approxctl.calibrate(model, [x])
    approxctl.fit_error_model(model, [x])
    gpu_model = copy.deepcopy(model).to(DEV)
    for m in (model, gpu_model):
        approxctl.set_mode(m, "inject")
    out_gpu = gpu_model(x.to(DEV))
    out_gpu.square().mean().backward()
    grads = [p.grad for p in gpu_model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    with torch.no_grad():
        for (name, layer), (_, gpu_layer) in zip(
            approx_layers(model), approx_layers(gpu_model), strict=True
        ):
            v = torch.linspace(-1, 1, 200_000)
            cpu_err = layer.error_model.sample(v)
            gpu_err = gpu_layer.error_model.sample(v.to(DEV)).cpu()
            spread = float(cpu_err.std()) + 1e-12
            assert abs(float(cpu_err.mean() - gpu_err.mean())) < 0.02 * spread + 1e-9, name
            assert float(gpu_err.std()) == pytest.approx(float(cpu_err.std()), rel=0.02), name


# ------------------------------------------------------------------------------ pointwise
@pytest.mark.parametrize("proxy", ["sc", "hardtanh", "hardtanh, negative inputs"])
def test_proxy_kernels_equal_the_torch_ops(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA proxy kernels (kernels/pointwise.cu) against the composed torch ops they
    replace, without error draws: outputs and every gradient, up to float rounding (the kernels'
    exp(-z) is a polynomial, torch's its own)."""
    from approxctl.backends import cuda_pointwise
    from approxctl.noise import ChannelLayout
    from approxctl.proxy_ops import hardtanh_pairs, sc_activation

    g = torch.Generator().manual_seed(0)
    shape, layout = (4, 3, 5, 7), ChannelLayout(3, 35)
    terms = 4 if "negative" in proxy else 2
    zs_cpu = [torch.rand(shape, generator=g) * 3 - 0.5 for _ in range(terms)]
    zs_cpu[0].view(-1)[:2] = torch.tensor([0.0, 2.0])  # the clamps' edges
    grad = torch.randn(shape, generator=g).to(DEV)
    bias_cpu = torch.randn(1, 3, 1, 1, generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0], device=DEV).view(1, 3, 1, 1)

    def run() -> list[torch.Tensor]:
        zs = [z.to(DEV).requires_grad_() for z in zs_cpu]
        bias = bias_cpu.to(DEV).requires_grad_()
        if proxy == "sc":
            out = sc_activation(zs[0], zs[1], scale, bias, layout=layout)
        else:
            pairs = [(zs[0], zs[1])] + ([(zs[2], zs[3])] if terms == 4 else [])
            out = hardtanh_pairs(pairs, 2.0, scale, bias, layout=layout)
        out.backward(grad)
        return [out.detach(), bias.grad, *(z.grad for z in zs)]

    assert cuda_pointwise.usable(grad)
    monkeypatch.setenv(cuda_pointwise.ENV_VAR, "0")
    assert not cuda_pointwise.usable(grad)
    monkeypatch.delenv(cuda_pointwise.ENV_VAR)
    fused = run()
    monkeypatch.setattr(cuda_pointwise, "usable", lambda *tensors: False)
    reference = run()
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_add_error_kernel_draws_at_the_polynomials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA error draw (one kernel) against torch's (randn and the polynomials as torch
    ops): the same mean and spread at every accumulator value, in place or not."""
    from approxctl.backends import cuda_pointwise
    from approxctl.noise import ChannelLayout, NoiseSpec, add_error

    spec = NoiseSpec(torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64),
                     torch.tensor([0.2, 0.1, 0.05], dtype=torch.float64), -1.0, 1.0)  # fmt: skip
    y = torch.linspace(-1, 1, 1 << 20, device=DEV).repeat(4)
    one, zero = torch.ones((), device=DEV), torch.zeros((), device=DEV)

    def draw() -> torch.Tensor:
        return add_error(y, spec, scale=one, bias=zero, layout=ChannelLayout(1, 1)) - y

    fused = draw()
    same = y.clone()
    add_error(same, spec, scale=one, bias=zero, layout=ChannelLayout(1, 1), inplace=True)
    assert not torch.equal(same - y, fused)  # a fresh key per call
    monkeypatch.setattr(cuda_pointwise, "usable", lambda *tensors: False)
    reference = draw()
    for lo, hi in ((-1.0, -0.5), (0.5, 1.0)):
        inside = (y >= lo) & (y < hi)
        for err in (fused, same - y):
            assert float(err[inside].mean()) == pytest.approx(
                float(reference[inside].mean()), abs=2e-3
            )
            assert float(err[inside].std()) == pytest.approx(
                float(reference[inside].std()), rel=0.02
            )
