"""Saved models: round trip, self-contained reload, and refusal of what we cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import approxctl
from approxctl.models import ResNetTiny
from approxctl.sources import SourceInfo


def _saved(tmp_path: Path, target: str) -> tuple[Path, nn.Module, torch.Tensor]:
    model = ResNetTiny(1, 10)
    x = torch.randn(6, 1, 16, 16)
    converted = approxctl.convert(model, target, example_inputs=x, exclude=["stem.*"])
    approxctl.fit_error_model(converted, [x])
    converted.approx_source = SourceInfo("builtin", "resnet_tiny", {"in_channels": 1})
    return approxctl.save(converted, tmp_path / target), converted, x


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
def test_round_trip_is_bit_identical_in_every_mode(tmp_path: Path, target: str) -> None:
    directory, original, x = _saved(tmp_path, target)
    loaded = approxctl.load(directory)
    original.eval()
    for mode in ("float", "exact", "inject"):
        approxctl.set_mode(original, mode)
        approxctl.set_mode(loaded, mode)
        torch.manual_seed(5)
        a = original(x)
        torch.manual_seed(5)
        assert torch.equal(a, loaded(x)), mode
    assert [n for n, _ in approxctl.approx_layers(loaded)] == [
        n for n, _ in approxctl.approx_layers(original)
    ]


def test_python_models_need_their_architecture(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    converted = approxctl.convert(model, "am", example_inputs=torch.randn(5, 4))
    approxctl.save(converted, tmp_path / "m")
    with pytest.raises(approxctl.ApproxError, match="model="):
        approxctl.load(tmp_path / "m")
    loaded = approxctl.load(tmp_path / "m", model=nn.Sequential(nn.Linear(4, 3)))
    x = torch.randn(2, 4)
    approxctl.set_mode(converted, "exact")
    approxctl.set_mode(loaded, "exact")
    assert torch.equal(converted(x), loaded(x))


def test_newer_format_and_broken_files_are_refused(tmp_path: Path) -> None:
    directory, _, _ = _saved(tmp_path, "sc")
    meta_path = directory / "approx.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(approxctl.ApproxError, match="newer"):
        approxctl.load(directory)
    meta_path.write_text(json.dumps(meta))
    (directory / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(approxctl.ApproxError, match="safetensors"):
        approxctl.load(directory)
    meta_path.unlink()
    with pytest.raises(approxctl.ApproxError, match=r"approx\.json is missing"):
        approxctl.load(directory)
