"""fx conversion, per-layer options, calibration and training steps (SPEC section 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import approxctl
from approxctl.layers import ApproxConv2d, ApproxLinear, approx_layers
from approxctl.models import ResNetTiny, TinyConv


class FunctionalNet(nn.Module):
    """Convolution and linear as functional calls on parameters, plus one on a computed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(4))
        self.w2 = nn.Parameter(torch.randn(3, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = y.mean(dim=(2, 3))
        z = F.linear(y, self.w2)
        return z + F.linear(y, self.w2 * 2)  # computed weight: not convertible


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            x = x * 2
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_functional_calls_become_approximate_layers() -> None:
    model = FunctionalNet()
    x = torch.randn(3, 2, 6, 6)
    converted = approxctl.convert(model, "am", example_inputs=x)
    kinds = sorted(type(m).__name__ for _, m in approx_layers(converted))
    assert kinds == ["ApproxConv2d", "ApproxLinear"]
    assert list(converted.approx_plan.unsupported.values()) == [
        "functional call whose weight is computed, not a parameter"
    ]
    approxctl.set_mode(converted, "float")
    assert torch.allclose(converted(x), model(x), atol=1e-6)


def test_untraceable_model_falls_back_to_module_swap() -> None:
    with pytest.warns(UserWarning, match="could not trace"):
        converted = approxctl.convert(Untraceable(), "sc")
    assert isinstance(converted, Untraceable)
    assert isinstance(converted.conv, ApproxConv2d) and isinstance(converted.fc, ApproxLinear)
    assert not converted.approx_plan.traced


def test_model_class_and_batchnorm_are_kept_and_original_untouched() -> None:
    model = TinyConv(1, 10, 32)
    converted = approxctl.convert(model, "analog")
    assert isinstance(converted, TinyConv)
    assert isinstance(converted.features[0][1], nn.BatchNorm2d)
    assert type(model.features[0][0]) is nn.Conv2d  # convert works on a copy
    assert converted.approx_plan.converted == [
        "features.0.0",
        "features.1.0",
        "features.2.0",
        "classifier",
    ]


def test_exclude_globs_and_override_precedence() -> None:
    model = ResNetTiny(3, 10)
    converted = approxctl.convert(
        model,
        "analog",
        exclude=["stem.*", "fc"],
        adc_bits=4,
        type_overrides={"Conv2d": {"adc_bits": 5}},
        layer_overrides={"layer3.*": {"adc_bits": 6}, "layer3.shortcut.*": {"adc_bits": 7}},
    )
    plan = converted.approx_plan
    assert plan.excluded == ["stem.0", "fc"]
    assert type(converted.stem[0]) is nn.Conv2d
    bits = {name: layer.config.adc_bits for name, layer in approx_layers(converted)}
    assert bits["layer1.conv1"] == 5  # module type beats global
    assert bits["layer3.conv1"] == 6  # name glob beats module type
    assert bits["layer3.shortcut.0"] == 7  # a later matching glob wins
    with pytest.raises(approxctl.ApproxError, match="adc_bits"):
        approxctl.convert(model, "analog", layer_overrides={"fc": {"adc_bits": 99}})


def test_bad_target_and_options_are_clear_errors() -> None:
    model = TinyConv(1, 10, 32)
    with pytest.raises(approxctl.ApproxError, match="unknown target 'quantum'"):
        approxctl.convert(model, "quantum")
    with pytest.raises(approxctl.ApproxError, match="unknown option"):
        approxctl.convert(model, "sc", adc_bits=4)
    with pytest.raises(approxctl.ApproxError, match="stream length"):
        approxctl.convert(model, "sc", length=48)
    with pytest.raises(approxctl.ApproxError, match="multiplier"):
        approxctl.convert(model, "am", lut="mul9_nope")
    with pytest.raises(approxctl.ApproxError, match="all excluded"):
        approxctl.convert(model, "sc", exclude=["*"])


def test_exact_multiplier_keeps_the_float_accuracy_within_quantization_error() -> None:
    model = TinyConv(1, 10, 32).eval()
    x = torch.randn(16, 1, 32, 32)
    converted = approxctl.convert(model, "am", lut="mul7u_003", example_inputs=x).eval()
    approxctl.set_mode(converted, "exact")
    reference = model(x)
    with torch.no_grad():
        error = (converted(x) - reference).abs().max() / reference.abs().max()
    assert error < 0.03
    # An approximate multiplier really does change the result.
    approximate = approxctl.convert(model, "am", lut="mul7u_0FV", example_inputs=x).eval()
    approxctl.set_mode(approximate, "exact")
    with torch.no_grad():
        assert (approximate(x) - reference).abs().max() / reference.abs().max() > 3 * error


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
@pytest.mark.parametrize("mode", ["float", "inject", "exact"])
def test_tinyconv_trains_a_step_in_every_mode(target: str, mode: str) -> None:
    model = TinyConv(1, 10, 16)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():  # BatchNorm statistics of a trained model, so eval-mode calibration fits
        for _ in range(30):
            model(x)
    converted = approxctl.convert(model, target, example_inputs=x)
    approxctl.fit_error_model(converted, [(x, y)])
    approxctl.set_mode(converted, mode)
    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    before = [p.detach().clone() for p in converted.parameters()]
    loss = F.cross_entropy(converted(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, converted.parameters(), strict=True)]
    assert all(changed)


def test_float_mode_equals_the_original_model_bit_for_bit() -> None:
    model = ResNetTiny(3, 10).eval()
    x = torch.randn(4, 3, 32, 32)
    converted = approxctl.convert(model, "sc", example_inputs=x).eval()
    assert torch.equal(converted(x), model(x))
