"""approx-mult's fused inject forward on CPU: the integer convolution (oneDNN int8 or float32),
its 8-bit codes, the output pass with the drawn error, and the float proxy's gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import approxctl
from approxctl.backends import cpu_codes, cpu_int8, cpu_pointwise
from approxctl.models import TinyConv
from approxctl.noise import NoiseSpec
from approxctl.profile import _saved_tensor_mb
from approxctl.proxy_ops import fake_quant, kernel_noise
from approxctl.quantized_conv import ConvGeometry, quantized_conv2d
from approxctl.targets.approx_mult import ApproxMultTarget

needs_int8 = pytest.mark.skipif(
    not cpu_int8.available(), reason="no exact oneDNN int8 convolution on this CPU (no VNNI)"
)
needs_any_int8 = pytest.mark.skipif(
    not cpu_int8._pair_bounded_available(), reason="no oneDNN int8 convolution on this CPU"
)

# (batch, in, out, size, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (4, 3, 8, 10, 3, 1, 1, 1, 1),
    (2, 6, 6, 9, 3, 2, 1, 2, 3),
    (3, 1, 16, 20, 5, 1, 2, 1, 1),
    (2, 8, 8, 7, 3, 1, 0, 1, 8),  # depthwise, no padding
    (2, 4, 5, 3, 3, 1, 0, 1, 1),  # a 1x1 output map
]


@needs_int8
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("zero_point", [0, 128])
def test_int8_conv_gives_the_exact_integer_sums(geometry: tuple[int, ...], zero_point: int) -> None:
    n, c, o, size, k, stride, pad, dil, groups = geometry
    gen = torch.Generator().manual_seed(sum(geometry) + zero_point)
    codes = torch.randint(0, 256, (n, c, size, size), generator=gen, dtype=torch.uint8)
    codes.view(-1)[::7] = 255  # extremes: products at 255 x 127 saturate 16-bit pair sums
    weight = torch.randint(-128, 128, (o, c // groups, k, k), generator=gen, dtype=torch.int8)
    weight.view(-1)[::5] = 127
    conv = ((stride, stride), (pad, pad), (dil, dil), groups)
    got = cpu_int8.conv2d(codes, zero_point, weight, *conv)
    want = F.conv2d(codes.double() - zero_point, weight.double(), None, *conv)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), want)


@needs_any_int8
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("zero_point", "code_max", "weight_max"), [(0, 255, 64), (64, 127, 128)])
def test_int8_conv_is_exact_where_pairs_of_products_fit_16_bits(
    geometry: tuple[int, ...], zero_point: int, code_max: int, weight_max: int
) -> None:
    """Whatever the CPU: ``2 * code * |weight| <= 32767`` for every product (``exact_for``)."""
    n, c, o, size, k, stride, pad, dil, groups = geometry
    gen = torch.Generator().manual_seed(sum(geometry) + zero_point)
    codes = torch.randint(0, code_max + 1, (n, c, size, size), generator=gen, dtype=torch.uint8)
    codes.view(-1)[::3] = code_max
    weight = torch.randint(
        -weight_max, min(weight_max, 127) + 1, (o, c // groups, k, k), generator=gen,
        dtype=torch.int16,
    ).to(torch.int8)  # fmt: skip
    weight.view(-1)[::4] = -weight_max
    weight.view(-1)[1::4] = min(weight_max, 127)
    assert 2 * code_max * weight_max <= cpu_int8.PAIR_SUM_MAX
    assert cpu_int8.exact_for(code_max, weight_max)
    conv = ((stride, stride), (pad, pad), (dil, dil), groups)
    got = cpu_int8.conv2d(codes, zero_point, weight, *conv)
    want = F.conv2d(codes.double() - zero_point, weight.double(), None, *conv)
    assert torch.equal(got.double(), want)


def test_exact_for_needs_vnni_only_past_the_pair_bound() -> None:
    assert cpu_int8.exact_for(255, 127) == cpu_int8.available()  # 2 x 255 x 127 > 32767
    if cpu_int8._pair_bounded_available():
        assert cpu_int8.exact_for(255, 64) and cpu_int8.exact_for(127, 128)
        assert cpu_int8.exact_for(32, 32)  # sc's default stream length


def _in_fresh_process(expression: str, **env: str) -> str:
    """What ``print(expression)`` writes in a new Python with ``cpu_int8`` imported and the
    environment variables ``env`` set (``cpu_int8`` decides once per process)."""
    code = f"from approxctl.backends import cpu_int8; print({expression})"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_the_environment_turns_every_int8_route_off() -> None:
    assert _in_fresh_process("cpu_int8.exact_for(32, 32)", APPROXCTL_CPU_INT8="0") == "False"


def test_pair_bounded_self_test_passes_with_avx2_only() -> None:
    """Without VNNI, the pair-bounded operands are exact (run with oneDNN limited to AVX2,
    whatever this CPU has): what lets sc, analog and approx-mult use int8 there."""
    assert _in_fresh_process("cpu_int8._self_test(True)", ONEDNN_MAX_CPU_ISA="AVX2") == "True"


def test_self_test_rejects_int8_without_vnni() -> None:
    """oneDNN without VNNI multiplies with saturating 16-bit pair sums: the first-use check
    must notice (run with oneDNN limited to AVX2, whatever this CPU has)."""
    assert _in_fresh_process("cpu_int8._self_test()", ONEDNN_MAX_CPU_ISA="AVX2") == "False"


def test_codes_are_fake_quant_bit_for_bit() -> None:
    step, qmax = np.float32(0.05), 127
    x = torch.cat([
        torch.randn(5000) * 4,
        torch.tensor([0.025, -0.025, 0.075, 6.35, -6.35, 6.375, -6.375, 6.4, 1e9, -1e9]),
        torch.tensor([float("inf"), float("-inf"), 0.0, -0.0]),
    ])  # fmt: skip
    codes = torch.empty(x.shape, dtype=torch.uint8)
    inside = torch.empty(x.shape, dtype=torch.uint8)
    nans = cpu_codes.quantize_codes(
        x.numpy(), np.float32(1) / step, np.float32(-qmax), np.float32(qmax), np.int32(128),
        codes.numpy(), inside.numpy(),
    )  # fmt: skip
    assert nans == 0
    want, want_inside = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
    cpu_pointwise.fake_quant_forward(
        x.numpy(), np.float32(1) / step, step, np.float32(-qmax), np.float32(qmax),
        want.numpy(), want_inside.numpy(),
    )  # fmt: skip
    back = torch.empty_like(x)
    cpu_codes.dequantize_codes(codes.numpy(), 128, step, back.numpy())
    assert torch.equal(back, want)
    assert torch.equal(inside, want_inside)
    assert int(codes.min()) >= 1 and int(codes.max()) <= 255

    x[[3, 40]] = float("nan")
    assert cpu_codes.quantize_codes(
        x.numpy(), np.float32(1) / step, np.float32(-qmax), np.float32(qmax), np.int32(128),
        codes.numpy(), inside.numpy(),
    ) == 2  # fmt: skip


def _affine(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, spec: NoiseSpec | None):  # type: ignore[no-untyped-def]
    n, c, h, w = acc.shape
    s_n, s_c, _, s_w = acc.stride()
    out = torch.empty(n, c, h, w)
    cpu_codes.affine_output(
        acc.as_strided((acc.numel(),), (1,)).numpy(), s_n, s_c, s_w, n, h * w,
        spec is not None, *kernel_noise(spec), scale.numpy(), np.float32(1.0), bias.numpy(),
        out.view(-1).numpy(),
    )  # fmt: skip
    return out


@pytest.mark.parametrize("shape", [(3, 5, 17, 19), (2, 4, 1, 1), (2, 3, 16, 16), (1, 2, 40, 40)])
def test_affine_output_reads_either_memory_order_and_draws_the_same(shape: tuple[int, ...]) -> None:
    acc = torch.randint(-3000, 3000, shape).float()
    scale, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    plain = _affine(acc, scale, bias, None)
    want = acc.double() * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    assert torch.equal(plain, want.float())  # one rounding: the kernel fuses multiply and add
    spec = NoiseSpec(torch.tensor([0.5, 2.0, -1.0]), torch.tensor([3.0, 1.0]), -3000.0, 3000.0)
    channels_last = acc.contiguous(memory_format=torch.channels_last)
    draws = []
    for source, threads in ((acc, 2), (channels_last, 2), (acc, 1)):
        torch.manual_seed(7)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            draws.append(_affine(source, scale, bias, spec))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], plain)


def test_affine_output_error_has_the_model_mean_and_std() -> None:
    torch.manual_seed(1)
    acc = torch.zeros(16, 8, 64, 64)
    spec = NoiseSpec(torch.tensor([0.25]), torch.tensor([2.0]), -1.0, 1.0)
    e = _affine(acc, torch.ones(8), torch.zeros(8), spec).double()
    assert float(e.mean()) == pytest.approx(0.25, abs=0.01)
    assert float(e.std()) == pytest.approx(2.0, rel=0.005)
    # no correlation between neighbouring pixels, channels or samples
    for a, b in ((e[..., 1:], e[..., :-1]), (e[:, 1:], e[:, :-1]), (e[1:], e[:-1])):
        r = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]
        assert abs(float(r)) < 0.01


def _operands(geometry: tuple[int, ...], seed: int = 0):  # type: ignore[no-untyped-def]
    n, c, o, size, k, stride, pad, dil, groups = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=gen) * 3
    w = torch.randn(o, c // groups, k, k, generator=gen)
    w_scale = w.abs().flatten(1).amax(1) / 127
    w_q = torch.round(w / w_scale.view(-1, 1, 1, 1))
    bias = torch.randn(o, generator=gen)
    conv = ConvGeometry((stride, stride), (pad, pad), (dil, dil), groups)
    return x, w_q, w_scale, bias, conv


@pytest.mark.parametrize(
    ("path", "keep_input"),
    [("int8", False), ("int8 pair-bounded", False), ("float fallback", False), ("int8", True),
     ("int8 pair-bounded", True)],
)  # fmt: skip
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_quantized_conv_sums_exactly_and_has_the_float_proxys_gradients(
    geometry: tuple[int, ...], path: str, keep_input: bool, signed: bool,
    int8_path: Callable[[str], None], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Every route gives the exact sums; an input with no negative value (zero point 0, codes
    up to 127) runs the int8 convolution without VNNI too, a signed one (codes up to 254) not."""
    int8_path(path)
    convs = []
    real = cpu_int8.conv2d

    def spy(codes: torch.Tensor, zero_point: int, *args: object) -> torch.Tensor:
        convs.append(zero_point)
        return real(codes, zero_point, *args)

    monkeypatch.setattr(cpu_int8, "conv2d", spy)
    x, w_q, w_scale, bias, conv = _operands(geometry)
    if not signed:
        x = x.abs()
    step = 0.02  # inputs beyond 127 steps are clamped: both gradient masks are exercised
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w_q, bias))
    out = quantized_conv2d(
        xa, wa, w_scale, ba, step=step, qmax=127, geometry=conv, noise=None, keep_input=keep_input
    )
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w_q, bias))
    proxy = F.conv2d(fake_quant(xb, step, -127, 127), wb * w_scale.view(-1, 1, 1, 1), bb, *args)

    ints = torch.clamp(torch.round(x / step), -127, 127).double()
    acc = F.conv2d(ints, w_q.double(), None, *args)
    scale = (w_scale * torch.tensor(step)).double().view(1, -1, 1, 1)
    assert torch.equal(out, (acc * scale + bias.double().view(1, -1, 1, 1)).float())
    assert torch.allclose(out, proxy, rtol=1e-5, atol=1e-4)  # the float proxy, up to rounding

    grad = torch.randn_like(out)
    out.backward(grad)
    proxy.backward(grad)
    for got, want in ((xa.grad, xb.grad), (wa.grad, wb.grad), (ba.grad, bb.grad)):
        assert torch.equal(got, want)
    int8 = path == "int8" or (path == "int8 pair-bounded" and not signed)
    assert convs == ([128 if signed else 0] if int8 else [])


@needs_any_int8
def test_int8_and_float32_sums_draw_the_same_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w_q, w_scale, bias, conv = _operands(GEOMETRIES[2], seed=3)
    x = x.abs()  # codes within [0, 127]: the int8 route serves them without VNNI too
    spec = NoiseSpec(torch.tensor([0.5, 3.0]), torch.tensor([2.0, 1.0]), -5000.0, 5000.0)
    outs = []
    for int8 in (True, False):
        monkeypatch.setattr(cpu_int8, "exact_for", lambda code_max, weight_max, on=int8: on)
        torch.manual_seed(5)
        outs.append(
            quantized_conv2d(x, w_q, w_scale, bias, step=0.05, qmax=127, geometry=conv, noise=spec)
        )
    assert torch.equal(outs[0], outs[1])


def test_nan_inputs_reach_the_outputs_that_see_them() -> None:
    x, w_q, w_scale, bias, conv = _operands(GEOMETRIES[0])
    x[1, 2, 4, 5] = float("nan")
    out = quantized_conv2d(x, w_q, w_scale, bias, step=0.05, qmax=127, geometry=conv, noise=None)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    want = F.conv2d(fake_quant(x, 0.05, -127, 127), w_q * w_scale.view(-1, 1, 1, 1), bias, *args)
    assert bool(torch.isnan(want).any())
    assert torch.equal(torch.isnan(out), torch.isnan(want))


def _am_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    model = approxctl.convert(TinyConv(1, 10, 16), "am", example_inputs=x)
    approxctl.fit_error_model(model, [x])
    approxctl.set_mode(model, "inject")
    return model.train(), x, y


def test_am_inject_runs_the_fused_conv_and_saves_less_than_the_float_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x, y = _am_model()
    calls = []
    fused = ApproxMultTarget.fused_inject

    def counted(self, layer, inputs, noise):  # type: ignore[no-untyped-def]
        out = fused(self, layer, inputs, noise)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ApproxMultTarget, "fused_inject", counted)
    memory = _saved_tensor_mb(lambda: F.cross_entropy(model(x), y))
    # the second and third convs; the first (K = 25, bound by memory) and the linear layer
    # compose it from the float proxy
    assert calls == [False, True, True, False]
    monkeypatch.setattr(ApproxMultTarget, "fused_inject", lambda *args: None)
    float_proxy = _saved_tensor_mb(lambda: F.cross_entropy(model(x), y))
    # 2 bytes per conv input element (codes, mask) against 5 (float input, mask); the rest
    # (BatchNorm, ReLU, pools, the linear layer) saves the same
    conv_inputs = 8 * 32 * 8 * 8 + 8 * 32 * 4 * 4
    assert float_proxy - memory == 3 * conv_inputs / 2**20
