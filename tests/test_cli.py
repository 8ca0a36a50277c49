"""The command line: JSON output, the convert job end to end, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import approxctl
from approxctl.cli import app

runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, list(args))


def test_targets_and_luts_json() -> None:
    result = _run("targets", "--json")
    assert result.exit_code == 0
    targets = {t["name"]: t for t in json.loads(result.stdout)}
    assert set(targets) == {"sc", "approx-mult", "analog"}
    assert targets["approx-mult"]["aliases"] == ["am"]
    assert targets["sc"]["options"]["length"] == 32
    assert targets["analog"]["options"]["adc_bits"] == 4
    result = _run("luts", "--json")
    luts = json.loads(result.stdout)
    assert len(luts) == 26
    default = [entry for entry in luts if entry["default"]]
    assert [entry["name"] for entry in default] == ["mul7u_09Y"]
    assert default[0]["mre_pct"] == pytest.approx(17.68)


@pytest.mark.parametrize("target", ["sc", "am", "analog"])
def test_convert_writes_a_directory_that_reloads_identically(tmp_path: Path, target: str) -> None:
    out = tmp_path / "model"
    result = _run(
        "convert", "tinyconv", "--target", target, "--data", "digits", "--calib-batches", "2",
        "--error-batches", "1", "--batch-size", "64", "--out", str(out), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["name"] for row in doc["layers"]] == [
        "features.0.0", "features.1.0", "features.2.0", "classifier"
    ]  # fmt: skip
    assert all("rel_err_std" in row for row in doc["layers"])
    meta = json.loads((out / "approx.json").read_text())
    assert meta["source"]["name"] == "tinyconv" and meta["target"] == doc["target"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    model = approxctl.load(out)
    again = approxctl.load(out)
    x = torch.rand(5, 1, 8, 8)
    approxctl.set_mode(model, "exact")
    approxctl.set_mode(again, "exact")
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_convert_excludes_and_options(tmp_path: Path) -> None:
    result = _run(
        "convert", "tinyconv", "--target", "analog", "--data", "digits", "--calib-batches", "1",
        "--error-batches", "1", "--exclude", "classifier", "--adc-bits", "6",
        "--noise-scale", "0.5", "--out", str(tmp_path / "m"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["excluded"] == ["classifier"]
    assert {row["adc_bits"] for row in doc["layers"]} == {6}
    saved = json.loads((tmp_path / "m" / "approx.json").read_text())
    assert saved["options"]["noise_scale"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "tinyconv", "--target", "quantum"], "unknown target 'quantum'"),
        (["convert", "tinyconv", "--target", "sc", "--adc-bits", "4"], "applies to target analog"),
        (["convert", "nosuchnet", "--target", "sc"], "unknown SOURCE 'nosuchnet'"),
        (["convert", "tinyconv", "--target", "sc", "--data", "mnist:/nope"], "/nope"),
        (["convert", "tinyconv", "--target", "am", "--lut", "missing.npy"], "does not exist"),
        (["convert", "tinyconv", "--target", "sc", "--sc-phase", "1,2"], "--sc-phase"),
        (["convert", "tinyconv", "--target", "sc", "--sc-length", "48"], "stream length 48"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_lut_file_shape_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "table.npy"
    np.save(bad, np.zeros((100, 100), dtype=np.int32))
    result = _run("convert", "tinyconv", "--target", "am", "--lut", str(bad), "--data", "digits")
    assert result.exit_code == 2
    assert "shape (128, 128) or (256, 256)" in result.stderr
