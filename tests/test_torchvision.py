"""Conversion across the torchvision classification families (SPEC section 2, issue 4).

One small member per family, random weights (``weights=None``, 10 classes), tiny inputs, one
calibration batch. For every family and target: every Conv2d/Linear converts and float mode
equals the original model bit for bit. Per family, beyond float mode:

* ``am`` with an exact multiplier (``mul7u_003``): every layer's emulation equals the integer
  conv/linear of its quantized operands (this checks the im2col/group geometry of each layer in
  place, with the strides, paddings, groups and memory layouts the family really produces); the
  exact-mode logits stay near float; inject mode (no error to inject) stays near exact mode;
* one of ``sc`` / ``analog``: sc's exact-mode output is finite; analog's exact layers each stay
  near their float output.

Exact and inject mode for every target with default options are ``slow`` (``pytest -m slow``).
Unconvertible layers and untraceable models: the tests at the end.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import approxctl
from approxctl.layers import ApproxLayer, approx_layers

torchvision = pytest.importorskip("torchvision")


class Family(NamedTuple):
    options: dict[str, Any]  # builder options besides weights=None, num_classes=10
    size: int  # input height and width (the family's minimum for tiny inputs)
    second: str  # the target besides am run in exact and inject mode
    exclude: tuple[str, ...] = ()  # kept float in the fast tests (not in the slow ones)


NO_AUX = {"aux_logits": False, "init_weights": False}
FAMILIES: dict[str, Family] = {
    "resnet18": Family({}, 32, "analog"),
    # VGG's 25088x4096 and 4096x4096 classifier layers cost more than the rest of the file.
    "vgg11": Family({}, 32, "sc", exclude=("classifier.0", "classifier.3")),
    "mobilenet_v2": Family({}, 32, "sc"),
    "mobilenet_v3_small": Family({}, 32, "analog"),
    "efficientnet_b0": Family({}, 32, "sc"),
    "regnet_x_400mf": Family({}, 32, "analog"),
    "densenet121": Family({}, 32, "sc"),
    "shufflenet_v2_x0_5": Family({}, 32, "analog"),
    "squeezenet1_0": Family({}, 32, "sc"),
    "convnext_tiny": Family({}, 32, "analog"),
    "googlenet": Family(NO_AUX, 32, "sc"),
    "inception_v3": Family(NO_AUX, 75, "analog"),  # 75x75: its smallest input
}
TARGETS = ("am", "sc", "analog")
# Fast options: an exact multiplier (so the emulation has a closed-form reference) and the
# max rule for ADC ranges (the mse search costs seconds per model on two cores).
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "am": {"lut": "mul7u_003"},
    "sc": {},
    "analog": {"adc_calib": "max"},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Small convs on a busy machine: one thread avoids OpenMP barrier stalls (100x here)."""
    try:
        import numba
    except ImportError:
        numba = None
    previous = torch.get_num_threads()
    numba_previous = numba.get_num_threads() if numba is not None else 0
    if numba is not None:  # first: with its OpenMP layer, this resets torch's thread count
        numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    if numba is not None:
        numba.set_num_threads(numba_previous)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Float models and one input batch per family, built once for the module."""
    return {}


def _family(zoo: dict, name: str) -> tuple[nn.Module, torch.Tensor]:
    if name not in zoo:
        options, size = FAMILIES[name].options, FAMILIES[name].size
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **options)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        zoo[name] = (model.eval(), x)
    return zoo[name]


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _convert(
    name: str, model: nn.Module, x: torch.Tensor, target: str, *, fast: bool = True
) -> nn.Module:
    exclude = FAMILIES[name].exclude if fast else ()
    options = FAST_OPTIONS[target] if fast else {}
    # ADC calibration costs seconds: the fast tests calibrate analog only where they run it.
    calibrate = not fast or target != "analog" or FAMILIES[name].second == "analog"
    converted = approxctl.convert(
        model, target, example_inputs=x if calibrate else None, exclude=exclude, **options
    )
    plan = converted.approx_plan
    assert plan.traced
    assert plan.unsupported == {}
    assert plan.excluded == list(exclude)
    # Every Conv2d and Linear converts, except the excluded ones.
    expected = [n for n in _layer_names(model) if n not in exclude]
    assert sorted(plan.converted) == sorted(expected), name
    assert len(approx_layers(converted.eval())) == len(expected)
    return converted


def _exact_vs_integer_reference(converted: nn.Module, x: torch.Tensor) -> int:
    """Run float mode; at each layer compare the am emulation (an exact multiplier) with the
    float64 conv/linear of the same integer operands. Returns the number of layers checked."""
    checked = []

    def hook(layer: ApproxLayer, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        q = layer.target.quantize(layer, args[0])
        ints = layer.target.integer_operands(q)
        exact = layer.target.exact(layer, q).double()
        reference = layer.accumulate(ints["a"].double(), ints["w"].double())
        assert exact.shape == out.shape, layer.layer_name
        # Integer sums beyond 2^24 round once, to float32, in the layer's output.
        assert torch.allclose(exact, reference, rtol=1e-6, atol=0), layer.layer_name
        checked.append(layer.layer_name)

    hooks = [layer.register_forward_hook(hook) for _, layer in approx_layers(converted)]
    try:
        approxctl.set_mode(converted, "float")
        with torch.no_grad():
            converted(x)
    finally:
        for handle in hooks:
            handle.remove()
    return len(checked)


def _local_errors(converted: nn.Module, x: torch.Tensor) -> list[float]:
    """Per layer, on the inputs of a float-mode run: |exact - float| / |float|."""
    errors = []

    def hook(layer: ApproxLayer, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        layer.mode = "exact"
        try:
            errors.append(_relative(layer._approx_forward(args[0]), out))
        finally:
            layer.mode = "float"

    hooks = [layer.register_forward_hook(hook) for _, layer in approx_layers(converted)]
    try:
        approxctl.set_mode(converted, "float")
        with torch.no_grad():
            converted(x)
    finally:
        for handle in hooks:
            handle.remove()
    return errors


def _exact_and_inject(converted: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    approxctl.set_mode(converted, "exact")
    with torch.no_grad():
        exact = converted(x)
    approxctl.fit_error_model(converted, [x])
    approxctl.set_mode(converted, "inject")
    with torch.no_grad():
        injected = converted(x)
    assert torch.isfinite(exact).all() and torch.isfinite(injected).all()
    return exact, injected


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_converts(zoo: dict, name: str, target: str) -> None:
    model, x = _family(zoo, name)
    converted = _convert(name, model, x, target)
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(converted(x), reference)  # float mode is the original, bit for bit
    if target == "am":
        assert _exact_vs_integer_reference(converted, x) == len(converted.approx_plan.converted)
        exact, injected = _exact_and_inject(converted, x)
        assert exact.shape == reference.shape
        # 7-bit operands, exact products: only quantization error, loosely bounded end to end.
        assert _relative(exact, reference) < 0.25
        # An exact multiplier leaves only float rounding to inject: inject mode tracks exact.
        assert _relative(injected, exact) < 0.25
    elif target == FAMILIES[name].second == "analog":
        # Every layer in exact mode on its float-mode input (a NaN fails the comparisons).
        # 4-bit ADCs per array are coarse, but each layer tracks float.
        errors = sorted(_local_errors(converted, x))
        assert errors[len(errors) // 2] < 0.5 and errors[-1] < 1.0
    elif target == FAMILIES[name].second:
        approxctl.set_mode(converted, "exact")
        with torch.no_grad():
            exact = converted(x)
        assert exact.shape == reference.shape and torch.isfinite(exact).all()


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exact_and_inject_with_default_options(zoo: dict, name: str, target: str) -> None:
    model, x = _family(zoo, name)
    converted = _convert(name, model, x, target, fast=False)
    exact, injected = _exact_and_inject(converted, x)
    assert exact.shape == injected.shape == model(x).shape


# ------------------------------------------------------------- what does not convert
def test_layers_that_compute_outside_their_forward_are_named(zoo: dict) -> None:
    """Swin's attention reads its Linear weights in a wrapped function: those stay float and
    are listed; everything else converts."""
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    converted = approxctl.convert(model, "am", example_inputs=x)
    plan = converted.approx_plan
    attention = [n for n in _layer_names(model) if ".attn." in n]
    assert sorted(plan.unsupported) == sorted(attention) and len(attention) == 24
    reason = plan.unsupported["features.1.0.attn.qkv"]
    assert "used directly by shifted_window_attention()" in reason and "float" in reason
    assert sorted(plan.converted + attention) == sorted(_layer_names(model))
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_auxiliary_classifiers_skipped_in_eval_mode_are_named() -> None:
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, num_classes=10, init_weights=False).eval()
    converted = approxctl.convert(model, "sc")
    aux = [n for n in _layer_names(model) if n.startswith("aux")]
    assert sorted(converted.approx_plan.unsupported) == sorted(aux) and len(aux) == 6
    assert "never called by the traced forward()" in converted.approx_plan.unsupported[aux[0]]
    assert type(converted.aux1.fc2) is nn.Linear  # left as it was


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.mean() > 0 else -x  # data-dependent control flow


class _Untraceable(_Attention):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.gate(x))


@pytest.mark.parametrize("model_type", [_Attention, _Untraceable])
def test_multihead_attention_projection_is_named(model_type: type[nn.Module]) -> None:
    model = model_type().eval()
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = approxctl.convert(model, "am", example_inputs=x)
    plan = converted.approx_plan
    assert plan.converted == ["stem", "head"]
    assert list(plan.unsupported) == ["attn.out_proj"]
    assert "inside MultiheadAttention 'attn'" in plan.unsupported["attn.out_proj"]
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_untraceable_model_warning_names_the_module_and_reason() -> None:
    with pytest.warns(UserWarning) as record:
        converted = approxctl.convert(_Untraceable(), "sc")
    message = str(record[0].message)
    assert "could not trace _Untraceable (in 'gate': TraceError:" in message
    assert "control flow" in message
    assert not converted.approx_plan.traced
    assert set(converted.approx_plan.converted) == {"stem", "head"}


class _ComputedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = nn.Parameter(torch.ones(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.conv.weight * self.scale, self.conv.bias)


def test_nothing_convertible_is_one_error_naming_layers_and_reasons() -> None:
    with pytest.raises(approxctl.ApproxError) as info:
        approxctl.convert(_ComputedWeight(), "am")
    message = str(info.value)
    assert "no Conv2d or Linear layer was converted" in message
    assert "conv2d: functional call whose weight is computed, not a parameter" in message
    assert "conv: its weight is used directly by mul()" in message
    assert "\n" not in message
    fx.symbolic_trace(_ComputedWeight())  # traceable: the reasons are about the layers
