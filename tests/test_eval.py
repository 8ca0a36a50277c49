"""`approxctl eval`: float mode equals plain PyTorch; exact/inject per target; reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from approxctl.cli import app
from approxctl.models import TinyConv

runner = CliRunner()


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits preprocessed here by hand: the last 20% for validation, pixels
    / 16, normalized with the training split's mean and std."""
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    split = len(images) - len(images) // 5
    mean, std = images[:split].mean(), images[:split].std()
    x = torch.tensor((images - mean) / std, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    return x[:split], y[:split], x[split:], y[split:]


def test_float_eval_of_a_weights_file_equals_plain_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyConv(1, 10, 8)
    x_train, y_train, x_val, y_val = _digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):  # a model far better than chance, so equality means something
        batch = slice((step * 64) % 1400, (step * 64) % 1400 + 64)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        expected = float((model.eval()(x_val).argmax(1) == y_val).double().mean())
    assert expected > 0.5
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    result = runner.invoke(
        app, ["eval", "tinyconv", "--weights", str(weights), "--data", "digits", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["mode"] for r in doc["results"]] == ["float"]
    assert doc["results"][0]["samples"] == 359
    assert doc["results"][0]["top1"] == expected


def test_exact_and_inject_eval_with_reports(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["eval", "tinyconv", "--target", "sc", "--data", "digits", "--mode", "exact",
         "--mode", "inject", "--calib-batches", "1", "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["mode"] for r in doc["results"]] == ["exact", "inject"]
    exact = doc["results"][0]
    assert set(exact["layers"]) == {"features.0.0", "features.1.0", "features.2.0", "classifier"}
    assert all(stats["err_std"] > 0 for stats in exact["layers"].values())
    assert 0 <= exact["top1"] <= exact["top5"] <= 1
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["results"] == doc["results"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| exact |" in markdown and "features.1.0" in markdown


def _converted_digits_model(out: Path, target: str) -> Path:
    convert = runner.invoke(
        app, ["convert", "tinyconv", "--target", target, "--data", "digits", "--calib-batches",
              "1", "--out", str(out), "--quiet"],
    )  # fmt: skip
    assert convert.exit_code == 0, convert.output
    return out


def test_eval_of_a_converted_directory_and_its_errors(tmp_path: Path) -> None:
    out = _converted_digits_model(tmp_path / "m", "am")
    result = runner.invoke(app, ["eval", str(out), "--data", "digits", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"] == "approx-mult"
    wrong = runner.invoke(app, ["eval", str(out), "--target", "sc", "--data", "digits"])
    assert wrong.exit_code == 2 and "converted for target approx-mult" in wrong.stderr
    no_target = runner.invoke(app, ["eval", "tinyconv", "--mode", "exact", "--data", "digits"])
    assert no_target.exit_code == 2 and "--target" in no_target.stderr


def test_eval_with_bn_recalib_reads_the_recalibrated_model_and_leaves_the_directory(
    tmp_path: Path,
) -> None:
    import approxctl
    from approxctl.evaluate import evaluate
    from approxctl.pipeline import DataOptions

    out = _converted_digits_model(tmp_path / "m", "sc")
    saved = (out / "model.safetensors").read_bytes()
    result = runner.invoke(
        app, ["eval", str(out), "--data", "digits", "--bn-recalib", "2", "--json",
              "--mode", "inject", "--mode", "exact", "--out", str(tmp_path / "report")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bn_recalib"] == 2
    assert "re-estimated in each mode on 2 training batches" in (
        tmp_path / "report" / "report.md"
    ).read_text()
    assert (out / "model.safetensors").read_bytes() == saved
    bundle = DataOptions(spec="digits", batch_size=256).load()
    model = approxctl.load(out)
    plain = evaluate(model, bundle.val, mode="exact", layer_errors=False)
    approxctl.recalibrate_batchnorm(model, bundle.train, mode="exact", max_batches=2)
    expected = evaluate(model, bundle.val, mode="exact", layer_errors=False)
    # exact, evaluated second, recalibrated on the same first two batches as inject did
    assert doc["results"][1]["loss"] == expected.loss != plain.loss
