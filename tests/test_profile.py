"""Gradient checkpointing and `approxctl profile` (SPEC section 5, paper section 3.4)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import approxctl
from approxctl.cli import app
from approxctl.convert import set_checkpointing
from approxctl.models import TinyConv
from approxctl.noise import use_kernels
from approxctl.profile import (
    _saved_tensor_mb,
    paired_ratio_quartiles,
    profile_modes,
    unsteady_ratios,
)


def _converted(target: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = TinyConv(1, 10, 16)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    converted = approxctl.convert(model, target, example_inputs=x)
    approxctl.fit_error_model(converted, [x])
    return converted.train(), x, y


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
@pytest.mark.parametrize("mode", ["exact", "inject"])
def test_checkpointing_keeps_values_and_gradients_and_saves_memory(target: str, mode: str) -> None:
    model, x, y = _converted(target)
    approxctl.set_mode(model, mode)
    results = []
    for enabled in (False, True):
        set_checkpointing(model, enabled)
        model.zero_grad()
        torch.manual_seed(3)  # the same injected error in both runs
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.manual_seed(3)
        memory = _saved_tensor_mb(lambda: F.cross_entropy(model(x), y))
        results.append((loss.detach(), grads, memory))
    (loss_a, grads_a, mem_a), (loss_b, grads_b, mem_b) = results
    assert torch.equal(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
    if target == "am" and mode == "inject" and use_kernels(x):
        # approx-mult's fused integer conv keeps the inputs' 8-bit codes, less than the float
        # inputs here (pool outputs, which nothing else keeps); checkpointed, it keeps the float
        # inputs, as float mode does (the checkpointed linear layer keeps less than float's).
        assert mem_a < mem_b
        approxctl.set_mode(model, "float")
        assert mem_b <= _saved_tensor_mb(lambda: F.cross_entropy(model(x), y))
    else:
        assert mem_b < mem_a


def test_profile_modes_reports_every_mode_and_ratio() -> None:
    model, x, y = _converted("am")
    doc = profile_modes(model, x, y, iters=1, warmup=0)
    assert set(doc["modes"]) == {"float", "exact", "inject"}
    for stats in [*doc["modes"].values(), *doc["checkpointing"].values()]:
        assert stats["step_s"] > 0 and stats["peak_mem_mb"] > 0
    base = doc["modes"]["float"]["step_s"]
    assert doc["ratios"]["exact"] == pytest.approx(doc["modes"]["exact"]["step_s"] / base)
    assert approxctl.get_mode(model) == "float"  # restored
    for mode in ("exact", "inject"):  # one round: both quartiles are that round's ratio
        q1, q3 = doc["ratio_quartiles"][mode]
        assert q1 == q3 == pytest.approx(doc["ratios"][mode])


def test_paired_ratios_pair_each_round_with_its_float_step() -> None:
    # Rounds 2 and 4 ran on a machine twice as slow: paired, every ratio is 2.
    assert paired_ratio_quartiles([2.0, 4.0, 2.0, 4.0], [1.0, 2.0, 1.0, 2.0]) == [2.0, 2.0]
    assert paired_ratio_quartiles([2.0, 4.0, 6.0, 8.0], [1.0] * 4) == [3.5, 6.5]


def test_unsteady_ratios_name_the_ratios_outside_their_per_round_range() -> None:
    result = {
        "ratios": {"exact": 2.9, "inject": 1.097},
        "ratio_quartiles": {"exact": [2.8, 3.0], "inject": [1.13, 1.23]},
        "checkpointing_ratios": {"exact": 3.3, "inject": 1.9},
        "checkpointing_ratio_quartiles": {"exact": [3.3, 3.6], "inject": [1.77, 1.89]},
    }
    assert unsteady_ratios(result) == ["inject", "inject + checkpointing"]
    del result["checkpointing_ratios"]  # a run without checkpointing
    assert unsteady_ratios(result) == ["inject"]
    result["ratios"]["inject"] = 1.13  # the range's ends count as inside
    assert unsteady_ratios(result) == []


def test_profile_cli_json_shape() -> None:
    result = CliRunner().invoke(
        app,
        ["profile", "tinyconv", "--target", "analog", "--batch-size", "4", "--iters", "1",
         "--warmup", "0", "--input-shape", "1,16,16", "--json", "--no-checkpointing"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["target"] == "analog" and doc["model"] == "tinyconv" and doc["batch_size"] == 4
    assert set(doc["modes"]) == {"float", "exact", "inject"}
    assert set(doc["ratios"]) == {"exact", "inject"}
    assert set(doc["ratio_quartiles"]) == {"exact", "inject"}
    assert isinstance(doc["device"], str) and doc["device"]


def test_profile_cli_bad_input_is_one_line_exit_2() -> None:
    result = CliRunner().invoke(app, ["profile", "tinyconv", "--target", "nope"])
    assert result.exit_code == 2
    assert "unknown target 'nope'" in result.stderr
    assert "Traceback" not in result.output
