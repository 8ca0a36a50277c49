"""approxctl.fused_conv: sc's and analog's proxies fused with their accumulations for
convolutions with few products per output, checked against the unfused path (exact integer sums
through ``sign_pair``, then ``hardtanh_pairs`` / ``sc_activation``): forward bit for bit,
gradients up to float rounding."""

from __future__ import annotations

import numba
import pytest
import torch

import approxctl
from approxctl import fused_conv, integer_conv, sign_pair
from approxctl.integer_conv import ConvGeometry, PairCodes
from approxctl.layers import ApproxConv2d
from approxctl.noise import ChannelLayout, NoiseSpec
from approxctl.proxy_ops import hardtanh_pairs, sc_activation

STEP = 0.02  # the input step; weights are codes / STEP, as AnalogTarget.proxy feeds them
L = 32  # sc's stream length: codes in [0, L], z = sums / L^2

# (batch, in, out, height, width, kernel, padding, dilation, groups, signed input)
CASES = {
    "tinyconv first layer": (3, 1, 8, 32, 32, 5, 2, 1, 1, True),
    "3 channels, dilated, not square": (2, 3, 5, 9, 13, 3, 1, 2, 1, True),
    "grouped, unsigned input": (2, 4, 6, 8, 8, 3, 0, 1, 2, False),
    "depthwise": (2, 3, 3, 10, 7, 3, 1, 1, 3, True),
    "outputs longer than a block": (1, 1, 3, 50, 50, 3, 1, 1, 1, True),
    "outputs shorter than 16": (4, 2, 5, 5, 5, 3, 0, 1, 1, True),
    "1x1 kernel": (2, 3, 4, 6, 6, 1, 0, 1, 1, True),
}
NOISE = NoiseSpec(torch.tensor([0.5]), torch.tensor([40.0]), -1e4, 1e4)
SC_NOISE = NoiseSpec(torch.tensor([0.01, 0.02]), torch.tensor([0.05]), -1.0, 1.0)


def _operands(case: tuple, seed: int, target: str):
    n, c, o, h, w_, k, _, _, g, signed = case
    top = 256 if target == "analog" else L + 1
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, top, (n, c, h, w_), generator=gen).float()
    codes[torch.rand(codes.shape, generator=gen) < 0.3] = 0  # zero inputs are common
    codes_neg = None
    if signed:  # x+ and x- never both nonzero
        codes_neg = torch.randint(0, top, codes.shape, generator=gen).float()
        codes_neg[codes > 0] = 0
    wtop = 128 if target == "analog" else L + 1
    w_codes = torch.randint(-wtop + 1, wtop, (o, c // g, k, k), generator=gen).float()
    w_codes[torch.rand(w_codes.shape, generator=gen) < 0.2] = 0  # zero weights get no gradient
    return codes, codes_neg, w_codes


def _pair(x, w_pos, w_neg, x_codes, wp_codes, wn_codes, geometry, out_scale):
    """Exact integer sums through sign_pair: the unfused path of integer_conv."""
    pc = PairCodes(
        x_codes.to(torch.uint8), wp_codes.to(torch.int8), wn_codes.to(torch.int8), out_scale,
        1 << 30,
    )  # fmt: skip
    return sign_pair.sign_pair(x, w_pos, w_neg, geometry, lambda: pc.sums(geometry))


def _reference(target, w_pos, w_neg, x_pos, x_neg, codes, geometry, proxy, scale, bias, noise):
    """The unfused path: exact sums through sign_pair, then the proxy node, as the targets'
    proxies compute them for K >= 64."""
    o = w_pos.shape[0]
    if target == "analog":
        pairs = [
            _pair(x, w_pos, w_neg, c, codes.w_pos, codes.w_neg, geometry, 1.0)
            for x, c in ((x_pos, codes.x_pos), (x_neg, codes.x_neg)) if x is not None
        ]  # fmt: skip
        layout = ChannelLayout(o, pairs[0][0].shape[2] * pairs[0][0].shape[3])
        return hardtanh_pairs(pairs, proxy.t, scale, bias, layout=layout, noise=noise)
    layer = ApproxConv2d.__new__(ApproxConv2d)  # group_concat of the layer, as sc.proxy
    layer.groups = geometry.groups
    if x_neg is None:
        x, xc, wp, wn = x_pos, codes.x_pos, (w_pos, codes.w_pos), (w_neg, codes.w_neg)
    else:
        x = ApproxConv2d.group_concat(layer, [x_pos, x_neg])
        xc = ApproxConv2d.group_concat(layer, [codes.x_pos, codes.x_neg])
        wp = (torch.cat([w_pos, w_neg], 1), torch.cat([codes.w_pos, codes.w_neg], 1))
        wn = (torch.cat([w_neg, w_pos], 1), torch.cat([codes.w_neg, codes.w_pos], 1))
    z_pos, z_neg = _pair(x, wp[0], wn[0], xc, wp[1], wn[1], geometry, proxy.unit)
    layout = ChannelLayout(o, z_pos.shape[2] * z_pos.shape[3])
    return sc_activation(z_pos, z_neg, scale, bias, layout=layout, noise=noise)


def _run(target: str, case: tuple, seed: int, noisy: bool, with_bias: bool):
    *_, pad, dil, groups, _ = case
    x_codes, x_neg_codes, w_codes = _operands(case, seed, target)
    geometry = ConvGeometry((1, 1), (pad, pad), (dil, dil), groups)
    x_pos = x_codes * STEP
    x_neg = None if x_neg_codes is None else x_neg_codes * STEP
    o = w_codes.shape[0]
    gen = torch.Generator().manual_seed(seed + 7)
    scale = (torch.rand(1, o, 1, 1, generator=gen) + 0.5) * 1e-3
    if target == "analog":
        # T low enough that a good share of the sums saturate, and some sit exactly at it
        proxy = fused_conv.Proxy("analog", t=float(127 * 255 * w_codes[0].numel() // 12))
        unit, noise = 1.0 / STEP, NOISE if noisy else None
    else:
        proxy = fused_conv.Proxy("sc", unit=1.0 / L**2)
        unit, noise = 1.0 / (L**2 * STEP), SC_NOISE if noisy else None
    codes = fused_conv.Codes(x_codes, x_neg_codes, w_codes.clamp(min=0), (-w_codes).clamp(min=0))
    results = []
    for fused in (True, False):
        # the weights as the targets feed them: one signed tensor through max(w, 0), max(-w, 0)
        w = (w_codes * unit).requires_grad_()
        w_pos, w_neg = w.clamp(min=0), (-w).clamp(min=0)
        bias = torch.randn(o, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        b = bias.view(1, -1, 1, 1) if with_bias else None
        torch.manual_seed(seed)  # the error draw's key
        if fused:
            inputs = [x for x in (x_pos, x_neg) if x is not None]
            assert fused_conv.usable(geometry, w, *inputs)
            y = fused_conv.fused_conv(
                w_pos, w_neg, x_pos, x_neg, codes, w_codes, geometry, proxy, scale, b,
                noise=noise,
            )  # fmt: skip
        else:
            y = _reference(
                target, w_pos, w_neg, x_pos, x_neg, codes, geometry, proxy, scale, b, noise
            )  # fmt: skip
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 3))
        (y * g).sum().backward()
        results.append((y.detach(), w.grad, bias.grad))
    return results


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("target", ["analog", "sc"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_the_unfused_path(target: str, name: str, noisy: bool) -> None:
    (y, gw, gb), (ref_y, ref_gw, ref_gb) = _run(target, CASES[name], 0, noisy, True)
    assert torch.equal(y, ref_y)  # same sums, proxy arithmetic, error draw: bit for bit
    _close(gw, ref_gw)
    _close(gb, ref_gb)


def test_analog_cases_reach_the_clamps_and_zero_weights() -> None:
    """The analog cases above saturate a good share of their sums and have zero weights (else
    they would not test the masks)."""
    case = CASES["tinyconv first layer"]
    codes, _, w_codes = _operands(case, 0, "analog")
    geometry = ConvGeometry((1, 1), (2, 2), (1, 1), 1)
    t = float(127 * 255 * w_codes[0].numel() // 12)
    z = integer_conv._conv_of_ints(
        codes.to(torch.uint8), 0, w_codes.clamp(min=0).to(torch.int8), geometry, torch.float64
    )
    assert 0.01 < float((z > t).double().mean()) < 0.5
    assert bool((w_codes == 0).any())


@pytest.mark.parametrize("target", ["analog", "sc"])
def test_no_bias_and_no_gradient_for_zero_weights(target: str) -> None:
    case = CASES["3 channels, dilated, not square"]
    (y, gw, gb), (ref_y, ref_gw, _) = _run(target, case, 1, False, False)
    assert torch.equal(y, ref_y)
    assert gb is None
    _, _, w_codes = _operands(case, 1, target)
    assert bool((gw[w_codes == 0] == 0).all())  # torch's clamp passes none at the bound
    _close(gw, ref_gw)


@pytest.mark.parametrize("target", ["analog", "sc"])
def test_backward_does_not_depend_on_the_thread_count(target: str) -> None:
    case = CASES["tinyconv first layer"]
    threads = numba.get_num_threads()
    grads = []
    try:
        for count in (1, threads):
            numba.set_num_threads(count)
            grads.append(_run(target, case, 2, True, True)[0])
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)


def test_usable_refuses_what_the_kernels_do_not_serve() -> None:
    x = torch.rand(2, 1, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    plain = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    assert fused_conv.usable(plain, w, x)
    assert not fused_conv.usable(ConvGeometry((2, 2), (1, 1), (1, 1), 1), w, x)  # stride
    assert not fused_conv.usable(plain, torch.randn(4, 8, 3, 3), torch.rand(2, 8, 8, 8))  # K
    assert not fused_conv.usable(plain, w, x.clone().requires_grad_())  # input gradient
    for bad in ([float("nan")], [float("inf")], [float("inf"), -float("inf")]):
        y = x.clone()
        y.view(-1)[3 : 3 + len(bad)] = torch.tensor(bad)
        assert not fused_conv.usable(plain, w, y)
    # finite values whose sum overflows: a false no (the unfused path serves them, as correctly)
    assert not fused_conv.usable(plain, w, torch.full((2, 1, 8, 8), 3e38))
    assert not fused_conv.usable(plain, w, x.double())


def _first_layer_model(target: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 12 * 12, 10),
    )  # fmt: skip
    x = torch.randn(8, 1, 12, 12)  # signed inputs: four accumulations
    model = approxctl.convert(model, target)
    approxctl.calibrate(model, [x])
    approxctl.fit_error_model(model, [x])
    return model, x


@pytest.mark.parametrize("target", ["analog", "sc"])
@pytest.mark.parametrize("mode", ["inject", "exact"])
def test_first_layer_uses_the_node_and_matches_the_unfused_path(
    monkeypatch, target: str, mode: str
) -> None:
    """A first layer goes through the fused node in inject and exact mode; its output and
    gradients match the unfused proxy (exact mode's output is the hardware's either way)."""
    model, x = _first_layer_model(target)
    approxctl.set_mode(model, mode)
    calls = []
    original = fused_conv.fused_conv
    monkeypatch.setattr(
        fused_conv, "fused_conv", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fused_conv, "usable", lambda *args: False)
        model.zero_grad()
        torch.manual_seed(1)  # the error draw's key
        y = model(x)
        y.square().sum().backward()
        conv = model.get_submodule("0")
        assert isinstance(conv, ApproxConv2d)
        results.append((y.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    assert len(calls) == 1
    (y, gw, gb), (ref_y, ref_gw, ref_gb) = results
    if mode == "exact":
        assert torch.equal(y, ref_y)
    else:  # the unfused sums are float convolutions of the dequantized operands
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-3, atol=1e-4 * float(ref_gw.abs().max()))
    torch.testing.assert_close(gb, ref_gb, rtol=1e-3, atol=1e-5)
