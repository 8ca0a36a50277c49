"""approxctl.hardtanh_conv: analog's proxy fused with its accumulations for convolutions with
few products per output, checked against the unfused path (exact integer sums through
``sign_pair``, then ``hardtanh_pairs``): forward bit for bit, gradients up to float rounding."""

from __future__ import annotations

import numba
import pytest
import torch

import approxctl
from approxctl import hardtanh_conv, integer_conv, sign_pair
from approxctl.integer_conv import ConvGeometry, PairCodes
from approxctl.layers import ApproxConv2d
from approxctl.noise import ChannelLayout, NoiseSpec
from approxctl.proxy_ops import hardtanh_pairs

STEP = 0.02  # the input step; weights are codes / STEP, as AnalogTarget.proxy feeds them

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


def _operands(case: tuple, seed: int):
    n, c, o, h, w_, k, _, _, g, signed = case
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, c, h, w_), generator=gen).float()
    codes[torch.rand(codes.shape, generator=gen) < 0.3] = 0  # zero inputs are common
    codes_neg = None
    if signed:  # x+ and x- never both nonzero
        codes_neg = torch.randint(0, 256, codes.shape, generator=gen).float()
        codes_neg[codes > 0] = 0
    w_codes = torch.randint(-127, 128, (o, c // g, k, k), generator=gen).float()
    w_codes[torch.rand(w_codes.shape, generator=gen) < 0.2] = 0  # zero weights get no gradient
    return codes, codes_neg, w_codes


def _reference(w, x_pos, x_neg, codes, geometry, t, scale, bias, noise):
    """The unfused path: each input's exact sums through sign_pair, then hardtanh_pairs."""
    w_pos, w_neg = w.clamp(min=0), (-w).clamp(min=0)
    w_int = codes[2].to(torch.int8)
    pairs = []
    for x, c in ((x_pos, codes[0]), (x_neg, codes[1])):
        if x is None:
            continue
        pc = PairCodes(
            c.to(torch.uint8), w_int.clamp(min=0), w_int.neg().clamp(min=0), 1.0, 1 << 30
        )
        sums = lambda pc=pc: pc.sums(geometry)  # noqa: E731
        pairs.append(sign_pair.sign_pair(x, w_pos, w_neg, geometry, sums))
    layout = ChannelLayout(w.shape[0], pairs[0][0].shape[2] * pairs[0][0].shape[3])
    return hardtanh_pairs(pairs, t, scale, bias, layout=layout, noise=noise)


def _run(case: tuple, seed: int, noise: NoiseSpec | None, with_bias: bool):
    *_, pad, dil, groups, _ = case
    codes, codes_neg, w_codes = _operands(case, seed)
    geometry = ConvGeometry((1, 1), (pad, pad), (dil, dil), groups)
    x_pos = codes * STEP
    x_neg = None if codes_neg is None else codes_neg * STEP
    o = w_codes.shape[0]
    gen = torch.Generator().manual_seed(seed + 7)
    scale = (torch.rand(1, o, 1, 1, generator=gen) + 0.5) * 1e-3
    # T low enough that a good share of the sums saturate, and some sit exactly at it
    t = float(127 * 255 * w_codes[0].numel() // 12)
    results = []
    for fused in (True, False):
        w = (w_codes / STEP).requires_grad_()
        bias = torch.randn(o, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        b = bias.view(1, -1, 1, 1) if with_bias else None
        codes_all = (codes, codes_neg, w_codes)
        torch.manual_seed(seed)  # the error draw's key
        if fused:
            assert hardtanh_conv.usable(geometry, w, *(x for x in (x_pos, x_neg) if x is not None))
            y = hardtanh_conv.hardtanh_conv(
                w, x_pos, x_neg, codes_all, geometry, t, scale, b, noise=noise
            )
        else:
            y = _reference(w, x_pos, x_neg, codes_all, geometry, t, scale, b, noise)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 3))
        (y * g).sum().backward()
        results.append((y.detach(), w.grad, bias.grad))
    return results


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("noisy", [False, True])
def test_matches_the_unfused_path(name: str, noisy: bool) -> None:
    (y, gw, gb), (ref_y, ref_gw, ref_gb) = _run(CASES[name], 0, NOISE if noisy else None, True)
    assert torch.equal(y, ref_y)  # same sums, masks, error draw: bit for bit
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4 * float(ref_gw.abs().max()))
    torch.testing.assert_close(gb, ref_gb, rtol=1e-4, atol=1e-4)


def test_saturation_and_zero_weights_are_exercised() -> None:
    """The cases above reach both clamps and zero weights (else they would not test the masks)."""
    case = CASES["tinyconv first layer"]
    codes, _, w_codes = _operands(case, 0)
    geometry = ConvGeometry((1, 1), (2, 2), (1, 1), 1)
    t = float(127 * 255 * w_codes[0].numel() // 12)
    z = integer_conv._conv_of_ints(
        codes.to(torch.uint8), 0, w_codes.clamp(min=0).to(torch.int8), geometry, torch.float64
    )
    assert 0.01 < float((z > t).double().mean()) < 0.5
    assert bool((w_codes == 0).any())


def test_no_bias_and_no_gradient_for_zero_weights() -> None:
    (y, gw, gb), (ref_y, ref_gw, _) = _run(CASES["3 channels, dilated, not square"], 1, None, False)
    assert torch.equal(y, ref_y)
    assert gb is None
    _, _, w_codes = _operands(CASES["3 channels, dilated, not square"], 1)
    assert bool((gw[w_codes == 0] == 0).all())  # torch's clamp passes none at the bound
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4 * float(ref_gw.abs().max()))


def test_backward_does_not_depend_on_the_thread_count() -> None:
    case = CASES["tinyconv first layer"]
    threads = numba.get_num_threads()
    grads = []
    try:
        for count in (1, threads):
            numba.set_num_threads(count)
            grads.append(_run(case, 2, NOISE, True)[0])
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)


def test_usable_refuses_what_the_kernels_do_not_serve() -> None:
    x = torch.rand(2, 1, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    plain = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    assert hardtanh_conv.usable(plain, w, x)
    assert not hardtanh_conv.usable(ConvGeometry((2, 2), (1, 1), (1, 1), 1), w, x)  # stride
    assert not hardtanh_conv.usable(plain, torch.randn(4, 8, 3, 3), torch.rand(2, 8, 8, 8))  # K
    assert not hardtanh_conv.usable(plain, w, x.clone().requires_grad_())  # input gradient
    nan = x.clone()
    nan[0, 0, 3, 3] = float("nan")
    assert not hardtanh_conv.usable(plain, w, nan)
    assert not hardtanh_conv.usable(plain, w, x.double())


def _first_layer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 12 * 12, 10),
    )  # fmt: skip
    x = torch.randn(8, 1, 12, 12)  # signed inputs: four accumulations
    model = approxctl.convert(model, "analog")
    approxctl.calibrate(model, [x])
    approxctl.fit_error_model(model, [x])
    return model, x


@pytest.mark.parametrize("mode", ["inject", "exact"])
def test_analog_layer_uses_the_node_and_matches_the_unfused_path(monkeypatch, mode: str) -> None:
    """An analog first layer goes through the fused node in inject and exact mode; its output
    and gradients match the unfused proxy (exact mode's output is the hardware's either way)."""
    model, x = _first_layer_model()
    approxctl.set_mode(model, mode)
    calls = []
    original = hardtanh_conv.hardtanh_conv
    monkeypatch.setattr(
        hardtanh_conv, "hardtanh_conv", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(hardtanh_conv, "usable", lambda *args: False)
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
