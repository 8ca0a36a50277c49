"""Approximate layers: geometry, modes, proxies and error models (SPEC sections 3-4)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import approxctl
from approxctl.functional import analog_matmul, sc_matmul
from approxctl.layers import ApproxConv2d, ApproxLinear

CONV_GEOMETRIES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise
    dict(in_channels=3, out_channels=5, kernel_size=1, bias=False),
    dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),  # asymmetric 'same'
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="replicate"),
]


def _convert_one(layer: nn.Module, target: str, x: torch.Tensor, **options) -> nn.Module:
    model = approxctl.convert(nn.Sequential(layer), target, example_inputs=x, **options)
    return model[0]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: str(g))
@pytest.mark.parametrize("table", ["mul8s_1KV6", "mul7u_003"])
def test_conv_geometry_with_exact_table_equals_integer_conv(geometry: dict, table: str) -> None:
    """With an exact multiplier the emulation must equal the integer conv of the same operands."""
    conv = nn.Conv2d(**geometry)
    x = torch.randn(2, geometry["in_channels"], 9, 8)
    layer = _convert_one(conv, "am", x, lut=table)
    q = layer.target.quantize(layer, x)
    ints = layer.target.integer_operands(q)
    exact = layer.target.exact(layer, q)
    reference = F.conv2d(
        F.pad(ints["a"].double(), conv._reversed_padding_repeated_twice, mode=_pad_mode(conv)),
        ints["w"].double(),
        None,
        conv.stride,
        0,
        conv.dilation,
        conv.groups,
    )
    assert exact.shape == conv(x).shape
    assert torch.equal(exact.double(), reference)


def _pad_mode(conv: nn.Conv2d) -> str:
    return "constant" if conv.padding_mode == "zeros" else conv.padding_mode


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES[:5], ids=lambda g: str(g))
def test_analog_without_quantization_loss_equals_integer_conv(geometry: dict) -> None:
    """16-bit ADCs over 2-input arrays with adc_max = 65535 quantize nothing (p <= 64770)."""
    conv = nn.Conv2d(**geometry)
    x = torch.rand(2, geometry["in_channels"], 7, 7)
    layer = _convert_one(conv, "analog", x, adc_bits=16, array_size=2)
    layer.adc_max.fill_(65535)
    q = layer.target.quantize(layer, x)
    ints = layer.target.integer_operands(q)
    reference = layer.accumulate(ints["a"].double(), ints["w"].double())
    assert torch.equal(layer.target.exact(layer, q).double(), reference)


def _unfold_rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    cols = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int64)


def test_sc_conv_signed_input_follows_the_spec_concatenation() -> None:
    """Negative inputs: K is [x+, x-] with b_pos = [w+, w-] and b_neg = [w-, w+] (SPEC 3.2)."""
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    x = torch.randn(2, 2, 5, 5)
    layer = _convert_one(conv, "sc", x)
    assert bool(layer.input_signed)
    q = layer.target.quantize(layer, x)
    ints = layer.target.integer_operands(q)
    a = torch.cat([_unfold_rows(ints["a"], conv), _unfold_rows(ints["a_neg"], conv)], 1)
    w_pos, w_neg = ints["w_pos"].flatten(1), ints["w_neg"].flatten(1)
    counts = sc_matmul(a, torch.cat([w_pos, w_neg], 1), torch.cat([w_neg, w_pos], 1), 32)
    value = (counts[..., 0] - counts[..., 1]).float() / 32  # (N*H*W, O)
    expected = value.view(2, 25, 3).permute(0, 2, 1).reshape(2, 3, 5, 5)
    assert torch.equal(layer.target.exact(layer, q), expected)
    approxctl.set_mode(nn.Sequential(layer), "exact")
    out = layer(x)
    assert torch.allclose(out, expected * layer.act_scale(), atol=0, rtol=1e-6)


def test_analog_signed_input_is_two_passes_subtracted() -> None:
    lin = nn.Linear(10, 4)
    x = torch.randn(6, 10)
    layer = _convert_one(lin, "analog", x, array_size=4)
    q = layer.target.quantize(layer, x)
    ints = layer.target.integer_operands(q)
    adc_max = int(layer.adc_max)
    b = ints["w"]
    codes = analog_matmul(ints["a"], b, 4, 4, adc_max) - analog_matmul(
        ints["a_neg"], b, 4, 4, adc_max
    )
    assert torch.equal(layer.target.exact(layer, q), codes.float() * (adc_max / 15))


def test_linear_accepts_any_leading_shape() -> None:
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    for target in ("sc", "am", "analog"):
        layer = _convert_one(lin, target, x)
        layer.set_mode("exact")
        assert layer(x).shape == (2, 5, 3)


# --------------------------------------------------------------------------- proxies
def _sc_linear(x: torch.Tensor) -> ApproxLinear:
    lin = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    return _convert_one(lin, "sc", x)


def test_sc_proxy_is_the_spec_formula_and_gradcheck_passes() -> None:
    x = torch.rand(4, 8)
    layer = _sc_linear(x).double()
    a = torch.rand(4, 8, dtype=torch.float64) * 32
    w_pos = torch.rand(3, 8, dtype=torch.float64) * 32
    w_neg = torch.rand(3, 8, dtype=torch.float64) * 32

    def proxy(a: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor) -> torch.Tensor:
        """The layer's proxy in the normalized domain (outputs come scaled by s_x / g)."""
        q = {"a": a, "a_step": torch.tensor(1.0), "w_pos": w_pos, "w_neg": w_neg}
        return layer.target.proxy(layer, q) / layer.target.output_scale(layer, q)

    x_pos = (a / 32) @ (w_pos / 32).T
    x_neg = (a / 32) @ (w_neg / 32).T
    spec = (1 - torch.exp(-x_pos)) - (1 - torch.exp(-x_neg))
    assert torch.allclose(proxy(a, w_pos, w_neg), spec, rtol=1e-12, atol=1e-12)
    args = tuple(t.requires_grad_() for t in (a, w_pos, w_neg))
    assert torch.autograd.gradcheck(proxy, args)


def test_analog_proxy_is_the_hardtanh_pair_and_gradcheck_passes() -> None:
    lin = nn.Linear(12, 3, bias=False)
    x = torch.rand(5, 12)
    layer = _convert_one(lin, "analog", x, array_size=4).double()
    t = float(layer.adc_max) * 3
    a = torch.rand(5, 12, dtype=torch.float64) * 255
    w = torch.randn(3, 12, dtype=torch.float64) * 127

    def proxy(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The proxy in products: unit activation step and weight scale."""
        q = {"a": a, "a_step": torch.tensor(1.0, dtype=a.dtype), "w": w,
             "w_scale": torch.ones(3, dtype=a.dtype)}  # fmt: skip
        return layer.target.proxy(layer, q)

    z_pos = a @ w.clamp(min=0).T
    z_neg = a @ (-w).clamp(min=0).T
    spec = z_pos.clamp(0, t) - z_neg.clamp(0, t)
    assert torch.allclose(proxy(a, w), spec)
    assert torch.autograd.gradcheck(proxy, (a.requires_grad_(), w.requires_grad_()))


def test_exact_mode_forward_is_exact_and_backward_is_the_proxy_gradient() -> None:
    x = torch.rand(4, 8)
    layer = _sc_linear(x)
    layer.set_mode("exact")
    w = layer.weight
    y = layer(x)
    q = layer.target.quantize(layer, x)
    assert torch.equal(y, layer.target.exact(layer, q) * layer.act_scale())
    (grad_exact,) = torch.autograd.grad(y.sum(), w)
    proxy_out = layer.target.proxy(layer, layer.target.quantize(layer, x))  # float units
    (grad_proxy,) = torch.autograd.grad(proxy_out.sum(), w)
    assert torch.equal(grad_exact, grad_proxy)
    assert grad_exact.abs().sum() > 0


@pytest.mark.parametrize("target", ["sc", "analog"])
def test_without_proxy_the_backward_is_the_plain_conv_gradient(target: str) -> None:
    """--no-proxy (the paper's Table 2 baseline): same forward, linear-accumulation gradient."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 6)  # signed input: the x- pass joins the gradient too
    conv = nn.Conv2d(3, 4, 3, padding=1)
    # A clamp T that some analog sums exceed, so that the two gradients must differ.
    options = {"proxy_clamp": 20000.0} if target == "analog" else {}
    with_proxy = _convert_one(conv, target, x, **options)
    plain = _convert_one(conv, target, x, proxy=False, **options)
    grads, outputs = [], []
    for layer in (with_proxy, plain):
        layer.set_mode("exact")
        y = layer(x)
        grads.append(torch.autograd.grad((y * y).sum(), layer.weight)[0])
        outputs.append(y.detach())
    assert torch.equal(outputs[0], outputs[1])
    # The plain gradient: a float conv on the quantized operands, straight through the rounding.
    q = plain.target.quantize(plain, x)
    if target == "sc":
        unit = 1.0 / (32**2 * float(q["a_step"]))
        w = (q["w_pos"] - q["w_neg"]) * unit
        z = plain.accumulate(q["a"], w) - plain.accumulate(q["a_neg"], w)
    else:
        w = q["w"] / q["a_step"]
        z = plain.accumulate(q["a"], w) - plain.accumulate(q["a_neg"], w)
    scale = plain.per_channel(plain.target.output_scale(plain, q))
    linear = z * scale + plain.per_channel(plain.bias)
    (expected,) = torch.autograd.grad((linear * plain(x).detach()).sum() * 2, plain.weight)
    torch.testing.assert_close(grads[1], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grads[0], grads[1])


# ---------------------------------------------------------------------- modes & errors
def test_uncalibrated_or_unfitted_layers_say_what_to_do() -> None:
    model = approxctl.convert(nn.Sequential(nn.Linear(4, 2)), "sc")
    approxctl.set_mode(model, "exact")
    with pytest.raises(approxctl.ApproxError, match="calibrate"):
        model(torch.rand(1, 4))
    approxctl.calibrate(model, [torch.rand(3, 4)])
    approxctl.set_mode(model, "inject")
    with pytest.raises(approxctl.ApproxError, match="fit_error_model"):
        model(torch.rand(1, 4))
    with pytest.raises(approxctl.ApproxError, match="unknown mode"):
        approxctl.set_mode(model, "fast")


def test_calibration_records_range_and_sign() -> None:
    model = approxctl.convert(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)), "sc")
    x = torch.tensor([[-3.0, 1.0, 0.5, 2.0], [0.0, 0.0, 1.0, -0.5]])
    approxctl.calibrate(model, [x])
    assert float(model[0].act_absmax) == 3.0
    assert bool(model[0].input_signed)
    assert not bool(model[2].input_signed)  # after ReLU


def test_analog_adc_calibration_methods() -> None:
    from approxctl.targets.analog import choose_adc_max

    p = torch.tensor([0, 1, 2, 3, 100, 1000])
    assert choose_adc_max(p, 4, "max") == 1000
    assert choose_adc_max(p, 4, "percentile:50") == 3  # ceil of the median 2.5
    best = choose_adc_max(p, 4, "mse")
    assert 1 <= best <= 1000
    with pytest.raises(approxctl.ApproxError):
        choose_adc_max(p, 4, "percentile:0")


@pytest.mark.parametrize("seed", range(4))
def test_mse_adc_max_is_the_best_candidate(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """The blocked search picks what a plain loop over the candidates picks (first of ties)."""
    from approxctl.backends import torch_ref
    from approxctl.targets import analog

    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(50_000, generator=gen).abs() * 3000 * (seed + 1)).round().to(torch.int64)
    p[: 1000 * seed] = 0  # many zero partial sums (inputs after a ReLU)
    bits = (2, 4, 6, 8)[seed]
    monkeypatch.setattr(analog, "MSE_BLOCK_ELEMENTS", 3 * 50_000)  # several blocks

    top = int(p.max())
    candidates = torch.unique(torch.linspace(1, top, analog.MSE_CANDIDATES).round().long())
    values, counts = torch.unique(p, return_counts=True)
    levels = (1 << bits) - 1
    best, best_err = top, float("inf")
    for c in candidates.tolist():
        deq = torch_ref.adc_code(values, bits, c).double() * (c / levels)
        err = float((counts.double() * (values.double() - deq) ** 2).sum())
        if err < best_err:
            best, best_err = c, err
    assert analog.choose_adc_max(p, bits, "mse") == best


def _proxy_in_accumulator_units(layer: nn.Module, q: dict) -> torch.Tensor:
    """The proxy without bias and output scale: the domain of exact() and the error models."""
    y = layer.target.proxy(layer, q).detach()
    bias = 0 if layer.bias is None else layer.per_channel(layer.bias.detach())
    return (y - bias) / layer.per_channel(layer.target.output_scale(layer, q))


@pytest.mark.parametrize("target", ["sc", "am"])
def test_type1_injection_reproduces_the_binned_exact_error(target: str) -> None:
    """Inject-mode error statistics match exact-mode errors on the calibration data (SPEC 4)."""
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(0.2)
    x = torch.rand(512, 64)
    model = approxctl.convert(nn.Sequential(lin), target, example_inputs=x)
    approxctl.fit_error_model(model, [x])
    layer = model[0]
    q = layer.target.quantize(layer, x)
    v = _proxy_in_accumulator_units(layer, q)
    err = layer.target.exact(layer, q) - v
    lo, hi = layer.error_model.domain.tolist()
    edges = torch.linspace(lo, hi, 6)
    draws = torch.stack([layer.error_model.sample(v) for _ in range(200)])
    checked = 0
    for left, right in itertools.pairwise(edges):
        inside = (v >= left) & (v < right)
        if inside.sum() < 200:
            continue
        e, d = err[inside], draws[:, inside]
        scale = float(err.std())
        assert abs(float(d.mean()) - float(e.mean())) < 0.15 * scale
        assert abs(float(d.std()) - float(e.std())) < 0.25 * scale
        checked += 1
    assert checked >= 2


def test_type2_injection_has_the_exact_error_mean_and_std() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.rand(16, 3, 8, 8)
    model = approxctl.convert(nn.Sequential(conv), "analog", example_inputs=x)
    approxctl.fit_error_model(model, [x])
    layer = model[0]
    q = layer.target.quantize(layer, x)
    proxy = _proxy_in_accumulator_units(layer, q)
    err = (layer.target.exact(layer, q) - proxy).double()
    assert float(layer.error_model.mean) == pytest.approx(float(err.mean()), rel=1e-6)
    assert float(layer.error_model.std) == pytest.approx(float(err.std(unbiased=False)), rel=1e-6)
    draws = layer.error_model.sample(proxy.repeat(20, 1, 1, 1))
    assert float(draws.mean()) == pytest.approx(float(err.mean()), abs=0.05 * float(err.std()))
    assert float(draws.std()) == pytest.approx(float(err.std()), rel=0.05)


def test_inject_costs_no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """inject mode must never run the exact op (that is its whole point)."""
    x = torch.rand(8, 6)
    model = approxctl.convert(nn.Sequential(nn.Linear(6, 4)), "am", example_inputs=x)
    approxctl.fit_error_model(model, [x])
    approxctl.set_mode(model, "inject")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("exact op called in inject mode")

    monkeypatch.setattr(type(model[0].target), "exact", fail)
    assert model(x).shape == (8, 4)


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
def test_exact_inference_skips_the_proxy_and_keeps_every_bit(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd (validation, eval) exact mode forwards the same bits and never computes
    the proxy, whose only use is the gradient; fitting an error model still does."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 10, 10)  # signed: the first layer's split inputs
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(800, 5))  # fmt: skip
    model = approxctl.convert(model, target, example_inputs=x)
    approxctl.set_mode(model, "exact")
    with_grad = model(x)
    assert with_grad.requires_grad
    calls = []
    proxy = type(model[0].target).proxy

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return proxy(*args, **kwargs)

    monkeypatch.setattr(type(model[0].target), "proxy", counted)
    with torch.no_grad():
        without = model(x)
    assert torch.equal(without.view(torch.int32), with_grad.detach().view(torch.int32))
    assert calls == []
    approxctl.fit_error_model(model, [x])  # records exact - proxy under no_grad
    assert calls and bool(model[0].error_model.fitted)


def test_conv_layer_keeps_the_float_interface() -> None:
    conv = nn.Conv2d(3, 4, 3)
    model = approxctl.convert(nn.Sequential(conv), "sc")
    layer = model[0]
    assert isinstance(layer, ApproxConv2d) and isinstance(layer, nn.Conv2d)
    assert layer.weight is conv.weight or torch.equal(layer.weight, conv.weight)
    assert {"weight", "bias"} <= set(dict(layer.named_parameters()))


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
@pytest.mark.parametrize("mode", ["exact", "inject"])
def test_bias_is_added_once_and_gets_the_plain_gradient(target: str, mode: str) -> None:
    lin = nn.Linear(12, 4)
    with torch.no_grad():
        lin.weight.mul_(0.3)
        lin.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(32, 12)
    model = approxctl.convert(nn.Sequential(lin), target, example_inputs=x)
    approxctl.fit_error_model(model, [x])
    layer = model[0]
    layer.set_mode(mode)
    out = layer(x)
    if mode == "exact":
        q = layer.target.quantize(layer, x)
        scale = layer.target.output_scale(layer, q)
        assert torch.equal(out, layer.target.exact(layer, q) * scale + layer.bias.detach())
    upstream = torch.randn_like(out)
    (bias_grad,) = torch.autograd.grad((out * upstream).sum(), layer.bias)
    assert torch.allclose(bias_grad, upstream.sum(0))
