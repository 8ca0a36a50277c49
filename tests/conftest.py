from collections.abc import Callable

import pytest
import torch

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
