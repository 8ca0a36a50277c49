from collections.abc import Callable

import pytest
import torch

import approxctl
from approxctl.backends import cpu_int8

INT8_PATHS = ["int8", "int8 pair-bounded", "float fallback"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def int8_path(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``int8_path(name)`` makes ``cpu_int8.exact_for`` answer as on a CPU with VNNI ("int8":
    any 8-bit operands), on one without ("int8 pair-bounded": operands whose pairs of products
    fit 16 bits), or with no int8 convolution ("float fallback"); skips where this CPU cannot
    run the route."""

    def choose(name: str) -> None:
        if name == "int8" and not cpu_int8.available():
            pytest.skip("no exact oneDNN int8 convolution on this CPU (no VNNI)")
        if name == "int8 pair-bounded" and not cpu_int8._pair_bounded_available():
            pytest.skip("no oneDNN int8 convolution on this CPU")
        rules: dict[str, Callable[[int, int], bool]] = {
            "int8": lambda code_max, weight_max: True,
            "int8 pair-bounded": lambda code_max, weight_max: (
                2 * code_max * weight_max <= cpu_int8.PAIR_SUM_MAX
            ),
            "float fallback": lambda code_max, weight_max: False,
        }
        monkeypatch.setattr(cpu_int8, "exact_for", rules[name])

    return choose


@pytest.fixture
def small_analog_model() -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    """``small_analog_model()``: a three-layer model converted for analog, calibrated, error
    models fitted, in inject mode, and its batch; built from seed 0 each call, so two calls
    give the same model. Its layers take each CPU path of analog's proxy: a fused first layer
    (K = 9), integer sums (K = 72) and a linear layer."""

    def make() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(8 * 36, 5),
        )  # fmt: skip
        x = torch.rand(4, 1, 6, 6)
        model = approxctl.convert(model, "analog")
        approxctl.calibrate(model, [x])
        approxctl.fit_error_model(model, [x])
        approxctl.set_mode(model, "inject")
        return model, x

    return make
