"""sc's and analog's inject proxies on CPU: their sums as exact integer convolutions
(approxctl.integer_conv), checked against float64 sums and against the float proxy's
gradients, on the int8 path and on both fallbacks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import approxctl
from approxctl import integer_conv
from approxctl.backends import cpu_int8
from approxctl.integer_conv import ConvGeometry, PairCodes, exact_sums, fake_quant_codes
from approxctl.layers import ApproxConv2d
from approxctl.proxy_ops import fake_quant
from approxctl.sign_pair import sign_pair

Int8Path = Callable[[str], None]  # the conftest fixture

# (batch, in, out, size, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (4, 3, 8, 10, 3, 1, 1, 1, 1),
    (2, 6, 6, 9, 3, 2, 1, 2, 3),
    (3, 2, 16, 20, 5, 1, 2, 1, 1),
    (2, 8, 8, 7, 3, 1, 0, 1, 8),  # depthwise, no padding
    (2, 4, 5, 3, 3, 1, 0, 1, 1),  # a 1x1 output map
]
PATHS = ["int8", "int8 pair-bounded", "float fallback"]  # conftest.int8_path


def _geometry(g: tuple[int, ...]) -> ConvGeometry:
    _, _, _, _, _, stride, pad, dil, groups = g
    return ConvGeometry((stride, stride), (pad, pad), (dil, dil), groups)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_exact_sums_are_the_integer_sums(
    geometry: tuple[int, ...], path: str, int8_path: Int8Path
) -> None:
    int8_path(path)
    n, c, o, size, k = geometry[:5]
    gen = torch.Generator().manual_seed(sum(geometry))
    codes = torch.randint(0, 256, (n, c, size, size), generator=gen, dtype=torch.uint8)
    w_codes = torch.randint(0, 128, (o, c // geometry[8], k, k), generator=gen, dtype=torch.int8)
    conv = _geometry(geometry)
    got = exact_sums(codes, 0, w_codes, conv, bound=255 * 127 * w_codes[0].numel())
    assert got.dtype == torch.float32
    assert torch.equal(got, F.conv2d(codes.double(), w_codes.double(), None, *conv.args).float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_scale", [1.0, 2.0**-10, 0.3])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_integer_sums_nchw_are_the_exact_sums_times_the_scale(
    geometry: tuple[int, ...], out_scale: float, path: str, int8_path: Int8Path
) -> None:
    """Every route (int8; float32 with the scale folded into the weights for a power of two;
    float32 then the output pass) gives float32(sum) * float32(out_scale), NCHW contiguous."""
    int8_path(path)
    n, c, o, size, k = geometry[:5]
    gen = torch.Generator().manual_seed(sum(geometry))
    codes = torch.randint(0, 33, (n, c, size, size), generator=gen, dtype=torch.uint8)
    w_codes = torch.randint(0, 33, (o, c // geometry[8], k, k), generator=gen, dtype=torch.int8)
    conv = _geometry(geometry)
    got = integer_conv.integer_sums_nchw(codes, w_codes, out_scale, conv, 32 * 32 * 10**4)
    sums = F.conv2d(codes.double(), w_codes.double(), None, *conv.args).float()
    assert got.is_contiguous()
    assert torch.equal(got, sums * torch.tensor(out_scale, dtype=torch.float32))


@pytest.mark.parametrize("path", PATHS)
def test_sums_past_2_24_are_rounded_once_on_every_path(path: str, int8_path: Int8Path) -> None:
    """Analog's sums reach 255 x 127 x K: above 2^24 the float32 fallback would round every
    partial sum, so it must switch to float64 and round once, as the int8 path does."""
    int8_path(path)
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(200, 256, (2, 64, 9, 9), generator=gen, dtype=torch.uint8)
    w_codes = torch.randint(90, 128, (6, 64, 5, 5), generator=gen, dtype=torch.int8)
    conv = ConvGeometry((1, 1), (2, 2), (1, 1), 1)
    want = F.conv2d(codes.double(), w_codes.double(), None, *conv.args)
    # sums of about 2^25, so a float32 convolution rounds several partial sums (this case
    # measured 180 of 972 outputs off in float32)
    assert float(want.max()) > 2**25 and not torch.equal(want.float().double(), want)
    got = exact_sums(codes, 0, w_codes, conv, bound=255 * 127 * 1600)
    assert torch.equal(got, want.float())


# (code_max, weight_max): analog's operands (shifted weights without VNNI), sc's, and
# products that fit 16-bit pairs as they are
PAIR_OPERANDS = [(255, 127), (32, 32), (255, 64), (200, 1)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("code_max", "weight_max"), PAIR_OPERANDS)
@pytest.mark.parametrize("out_scale", [1.0, 2.0**-10, 0.3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_pair_sums_are_both_exact_sums_times_the_scale(
    geometry: tuple[int, ...], out_scale: float, code_max: int, weight_max: int, path: str,
    int8_path: Int8Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """PairCodes.sums, by one int8 convolution of [w+; w-] (shifted to [-64, 63] for analog's
    operands without VNNI, the window sums added back) or by one convolution per sign, gives
    float32(sum) * float32(out_scale) for both signs, NCHW contiguous, grouped convs included."""
    int8_path(path)
    n, c, o, size, k = geometry[:5]
    gen = torch.Generator().manual_seed(sum(geometry) + code_max + weight_max)
    codes = torch.randint(0, code_max + 1, (n, c, size, size), generator=gen, dtype=torch.uint8)
    codes.view(-1)[::5] = code_max  # extremes: the largest products
    signed = torch.randint(
        -weight_max, weight_max + 1, (o, c // geometry[8], k, k), generator=gen, dtype=torch.int16
    )
    signed.view(-1)[::3] = weight_max
    signed.view(-1)[1::7] = -weight_max
    w_pos, w_neg = signed.clamp(min=0).to(torch.int8), (-signed).clamp(min=0).to(torch.int8)
    conv = _geometry(geometry)
    convs = []
    real = cpu_int8.conv2d

    def spy(codes: torch.Tensor, zero_point: int, weight: torch.Tensor, *args: object) -> object:
        convs.append(weight)
        return real(codes, zero_point, weight, *args)

    monkeypatch.setattr(cpu_int8, "conv2d", spy)
    pair = PairCodes(codes, w_pos, w_neg, out_scale, code_max * weight_max * signed[0].numel(),
                     code_max)  # fmt: skip
    got = pair.sums(conv)
    for out, w in zip(got, (w_pos, w_neg), strict=True):
        sums = F.conv2d(codes.double(), w.double(), None, *conv.args).float()
        assert out.is_contiguous()
        assert torch.equal(out, sums * torch.tensor(out_scale, dtype=torch.float32))
    if path == "float fallback":
        assert not convs
    else:  # one convolution for both signs, its weights within the pair bound
        assert len(convs) == 1 and convs[0].shape[0] == 2 * o
        assert 2 * code_max * integer_conv.magnitude_max(convs[0]) <= cpu_int8.PAIR_SUM_MAX or (
            path == "int8"
        )


@pytest.mark.parametrize("geometry", [*GEOMETRIES, (2, 6, 6, 1, 3, 1, 1, 1, 2)])
@pytest.mark.parametrize("height", [None, 5])
@pytest.mark.parametrize("order", ["channels-last", "plain"])
def test_window_sums_are_each_windows_sum_of_its_groups_codes(
    geometry: tuple[int, ...], height: int | None, order: str
) -> None:
    """The shift's correction term: for each output position and group, the sum of the codes
    its window reads (zero padding outside), against a float64 convolution of ones; square
    and non-square maps, strides, dilation, groups, a 1x1 input, all codes at 255."""
    n, c, _, size, k = geometry[:5]
    conv = _geometry(geometry)
    groups = conv.groups
    gen = torch.Generator().manual_seed(sum(geometry))
    shape = (n, c, height or size, size)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[0] = 255
    if order == "channels-last":
        codes = codes.contiguous(memory_format=torch.channels_last)
    got = integer_conv._window_sums(codes, torch.Size((k, k)), conv)
    ones = torch.ones(groups, c // groups, k, k, dtype=torch.float64)
    per_group = F.conv2d(codes.double(), ones, None, conv.stride, conv.padding, conv.dilation,
                         groups)  # fmt: skip
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, per_group.float())


def test_pair_sums_past_the_shifts_float32_range_take_two_exact_convolutions(
    int8_path: Int8Path,
) -> None:
    """Shifted weights need code_max * 64 * K below 2^24 (K < 1028) for both terms to be exact
    in float32: a longer reduction takes the per-sign route (here float64, sums past 2^24)."""
    int8_path("int8 pair-bounded")
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(250, 256, (2, 128, 5, 5), generator=gen, dtype=torch.uint8)
    w_pos = torch.randint(100, 128, (4, 128, 3, 3), generator=gen, dtype=torch.int8)
    w_neg = torch.zeros_like(w_pos)
    conv = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    pair = PairCodes(codes, w_pos, w_neg, 1.0, 255 * 127 * 1152)
    assert pair._int8_pair(conv) is None
    got = pair.sums(conv)
    want = F.conv2d(codes.double(), w_pos.double(), None, *conv.args)
    assert float(want.max()) > 2**24
    assert torch.equal(got[0], want.float()) and not bool(got[1].any())


def _float_convs(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtypes of the float fallback's convolutions, recorded as they run (the tests'
    own references call torch.conv2d, which the spy does not see)."""
    monkeypatch.setattr(cpu_int8, "exact_for", lambda code_max, weight_max: False)
    dtypes: list[torch.dtype] = []
    real = integer_conv.F.conv2d

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        dtypes.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(integer_conv.F, "conv2d", spy)
    return dtypes


def test_float_fallback_proves_large_bounds_exact_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Non-negative products whose bound passes 2^24 but whose sums stay below it (analog's
    trained layers) cost one float32 convolution, whether 255 times the weight codes' sums
    proves it or the float32 total does; sums that reach 2^24 are redone in float64."""
    dtypes = _float_convs(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    conv = ConvGeometry((1, 1), (2, 2), (1, 1), 1)
    codes = torch.randint(0, 40, (2, 32, 8, 8), generator=gen, dtype=torch.uint8)
    w_codes = torch.randint(0, 128, (4, 32, 5, 5), generator=gen, dtype=torch.int8)
    for weights in (w_codes, w_codes.clamp(min=110)):  # weight sums * 255 below, above 2^24
        dtypes.clear()
        got = exact_sums(codes, 0, weights, conv, bound=255 * 127 * 800)
        want = torch.conv2d(codes.double(), weights.double(), None, *conv.args)
        assert float(want.max()) < 2**24 and torch.equal(got, want.float())
        assert dtypes == [torch.float32]

    dtypes.clear()
    big = torch.full_like(codes, 255)
    got = exact_sums(big, 0, w_codes.clamp(min=110), conv, bound=255 * 127 * 800)
    want = torch.conv2d(big.double(), w_codes.clamp(min=110).double(), None, *conv.args)
    assert float(want.max()) > 2**24 and torch.equal(got, want.float())
    assert dtypes == [torch.float32, torch.float64]


def test_float_fallback_trusts_no_float32_total_of_mixed_signs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With negative weight codes, partial sums can pass 2^24 (and round) while the total
    comes back below it: such a convolution runs in float64 from the start."""
    dtypes = _float_convs(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    conv = ConvGeometry((1, 1), (0, 0), (1, 1), 1)
    codes = torch.randint(200, 256, (2, 64, 5, 5), generator=gen, dtype=torch.uint8)
    w_codes = torch.randint(100, 128, (3, 64, 5, 5), generator=gen, dtype=torch.int8)
    w_codes[:, 32:] *= -1  # the second half of the channels takes the first half's sum back
    want = torch.conv2d(codes.double(), w_codes.double(), None, *conv.args)
    float32 = torch.conv2d(codes.float(), w_codes.float(), None, *conv.args)
    assert float(want.abs().max()) < 2**24 and not torch.equal(float32.double(), want)
    got = exact_sums(codes, 0, w_codes, conv, bound=255 * 127 * 1600)
    assert torch.equal(got, want.float())
    assert dtypes == [torch.float64]


def test_fake_quant_codes_are_fake_quant_bit_for_bit() -> None:
    step, qmax = 0.03, 32
    x = torch.cat([torch.randn(3000) * 0.6, torch.tensor([0.015, 0.045, -0.01, 0.96, 0.975, 9.0])])
    xa = x.view(2, 3, 1, 501).clone().requires_grad_()
    xb = x.view(2, 3, 1, 501).clone().requires_grad_()
    got, codes = fake_quant_codes(xa, step, qmax)
    want = fake_quant(xb, step, 0, qmax)
    assert codes is not None and codes.dtype == torch.uint8
    assert torch.equal(got, want)
    assert torch.equal(codes.float() * torch.tensor(step), want)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(xa.grad, xb.grad)  # the straight-through mask: zero outside [0, qmax]
    assert bool((xa.grad == 0).any()) and bool((xa.grad != 0).any())

    x[5] = float("nan")
    got, codes = fake_quant_codes(x.view(1, 1, 2, -1), step, qmax)
    assert codes is None and bool(torch.isnan(got).any())  # the caller accumulates in float


@pytest.mark.parametrize("edge", [None, -0.016, 0.976, float("nan")])
def test_fake_quant_codes_gradient_within_range_passes_unchanged(edge: float | None) -> None:
    """Inputs all within [0, qmax * step] (the ends included: codes 0 and qmax): the gradient
    comes back as it went in; one input outside (or NaN) and it is masked there, as
    ``fake_quant``'s is."""
    step, qmax = 0.03, 32
    x = torch.rand(2, 8, 6, 5) * 0.96
    x.view(-1)[:3] = torch.tensor([0.0, 0.96, 0.9749])  # codes 0, 32 and 32 (rounded down)
    if edge is not None:
        x.view(-1)[7] = edge  # rounds to code -1, 33, or NaN: outside
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, _ = fake_quant_codes(xa, step, qmax)
    want = fake_quant(xb, step, 0, qmax)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(xa.grad, xb.grad)
    assert (edge is None) == torch.equal(xa.grad, grad)


@pytest.mark.parametrize("words", [True, False])
@pytest.mark.parametrize(
    "shape", [(2, 8, 17, 19), (3, 24, 5, 4), (1, 5, 16, 16), (2, 16, 1, 1), (0, 8, 5, 5)]
)
def test_fake_quant_codes_are_channels_last_codes_of_every_element(
    shape: tuple[int, ...], words: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiles of 256 pixels, a last partial tile, an empty batch, channel counts with and without
    # the 64-bit stores (``words`` False: the byte stores a big-endian machine would take)
    monkeypatch.setattr(integer_conv, "_WORDS", words)
    gen = torch.Generator().manual_seed(sum(shape))
    step, qmax = 0.02, 255
    x = (torch.rand(shape, generator=gen) * 6 - 1).requires_grad_()
    got, codes = fake_quant_codes(x, step, qmax)
    assert codes is not None and codes.is_contiguous(memory_format=torch.channels_last)
    want = torch.clamp(torch.round(x.detach() / step), 0, qmax)
    assert torch.equal(codes.to(torch.float32), want)
    assert torch.equal(got, fake_quant(x.detach(), step, 0, qmax))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_integer_pair_has_exact_sums_and_the_float_convs_gradients(
    geometry: tuple[int, ...], path: str, int8_path: Int8Path
) -> None:
    int8_path(path)
    n, c, o, size, k = geometry[:5]
    gen = torch.Generator().manual_seed(len(geometry) + size)
    length, step = 32, 0.037  # sc's operands: stream probabilities times weight codes
    x = torch.rand(n, c, size, size, generator=gen) * 1.3  # some beyond 1: clamped
    w_codes = torch.randint(0, length + 1, (o, c // geometry[8], k, k), generator=gen)
    unit = 1.0 / (length**2 * step)
    conv = _geometry(geometry)

    w2_codes = w_codes.flip(0)  # a second weight: the pair's other stream
    xa, wa = x.clone().requires_grad_(), w_codes.float().requires_grad_()
    x_q, codes = fake_quant_codes(xa, step, length)
    assert codes is not None
    pair = PairCodes(
        codes, w_codes.to(torch.int8), w2_codes.to(torch.int8), out_scale=1.0 / length**2,
        bound=length**2 * w_codes[0].numel(),
    )  # fmt: skip
    outs = sign_pair(x_q, wa * unit, wa.flip(0) * unit, conv, lambda: pair.sums(conv))
    xb, wb = x.clone().requires_grad_(), w_codes.float().requires_grad_()
    xb_q = fake_quant(xb, step, 0, length)
    proxies = [F.conv2d(xb_q, w * unit, None, *conv.args) for w in (wb, wb.flip(0))]

    ints = torch.clamp(torch.round(x / step), 0, length).double()
    grads = []
    for out, proxy, wc in zip(outs, proxies, (w_codes, w2_codes), strict=True):
        acc = F.conv2d(ints, wc.double(), None, *conv.args)
        assert out.is_contiguous()
        assert torch.equal(out, (acc / length**2).float())
        assert torch.allclose(out, proxy, rtol=1e-5, atol=1e-5)  # the float proxy, up to rounding
        grads.append(torch.randn_like(out))  # unrelated: the pair's two dense backward passes
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(proxies, grads)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-6, atol=1e-6)


def _layer(
    target: str, in_channels: int, signed: bool, groups: int = 1, stride: int = 1,
    **options: object,
) -> tuple[ApproxConv2d, torch.Tensor]:  # fmt: skip
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, 8, 5, stride=stride, padding=2, groups=groups)
    model = torch.nn.Sequential(conv)
    x = torch.randn(4, in_channels, 10, 10)
    x = x if signed else x.abs()
    model = approxctl.convert(model, target, example_inputs=x, **options)
    approxctl.fit_error_model(model, [x])
    layer = model[0]
    assert isinstance(layer, ApproxConv2d)
    return layer, x


@pytest.mark.parametrize("target", ["sc", "analog"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(("channels", "groups", "stride"), [(4, 1, 1), (8, 2, 2)])
def test_inject_uses_integer_sums_and_keeps_the_float_proxys_values(
    target: str, signed: bool, channels: int, groups: int, stride: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    layer, x = _layer(target, channels, signed, groups, stride)  # K = 4 x 5 x 5 = 100
    calls = []
    real = PairCodes.sums

    def counted(self: PairCodes, geometry: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(self, geometry)

    monkeypatch.setattr(PairCodes, "sums", counted)
    outs, grads = [], []
    for integer in (True, False):
        monkeypatch.setattr(ApproxConv2d, "integer_sums", lambda self, x, on=integer: on)
        layer.set_mode("inject")
        layer.zero_grad()
        torch.manual_seed(3)  # the same error draws
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append((xi.grad, layer.weight.grad.clone()))
        if integer:
            assert len(calls) == (2 if signed and target == "analog" else 1)
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(outs[0], layer.float_forward(x))  # an error was injected
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_integer_sums_only_in_inject_mode_and_on_wide_reductions() -> None:
    wide, x = _layer("sc", 4, False)  # K = 100
    narrow, x1 = _layer("sc", 1, False)  # K = 25: bound by memory, the float path is faster
    wide.set_mode("inject")
    narrow.set_mode("inject")
    assert wide.integer_sums(x) and not narrow.integer_sums(x1)
    assert not wide.integer_sums(x.double())  # float32 on CPU only
    wide.set_mode("exact")
    assert not wide.integer_sums(x)


@pytest.mark.parametrize(("length", "integer"), [(64, True), (128, False), (256, False)])
def test_sc_streams_longer_than_int8_weights_take_the_float_path(
    length: int, integer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, x = _layer("sc", 4, True, length=length)
    calls = []
    monkeypatch.setattr(integer_conv, "exact_sums", lambda *a, **k: calls.append(1) or 0)
    layer.set_mode("inject")
    q = layer.target.quantize(layer, x)
    assert ("a_codes" in q and "a_neg_codes" in q) == integer
    if not integer:
        out = layer(x)
        assert out.shape == (4, 8, 10, 10) and bool(torch.isfinite(out).all()) and not calls
