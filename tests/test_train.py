"""The training method (SPEC section 4): schedules, resume, improvement, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import approxctl
from approxctl.cli import app
from approxctl.models import TinyConv
from approxctl.pipeline import DataOptions
from approxctl.train import TrainConfig, Trainer, calibration_batches

runner = CliRunner()


def test_calibration_schedule_follows_the_spec() -> None:
    config = TrainConfig(calib_per_epoch=5, calib_every=10)
    assert calibration_batches("poly", 100, config) == {0, 20, 40, 60, 80}
    assert calibration_batches("poly", 3, config) == {0, 1, 2}
    assert calibration_batches("gaussian", 35, config) == {0, 10, 20, 30}


@pytest.mark.parametrize(("target", "expected_per_epoch"), [("am", 5), ("analog", 3)])
def test_calibration_really_happens_at_those_batches(
    monkeypatch: pytest.MonkeyPatch, target: str, expected_per_epoch: int
) -> None:
    """Count exact-mode refits per inject epoch: 5 per epoch (type 1), every 10 batches (type 2)."""
    from approxctl import train as train_module

    calls: list[int] = []
    original = train_module.fit_error_model

    def counting(model, batches):  # type: ignore[no-untyped-def]
        calls.append(len(batches))
        return original(model, batches)

    monkeypatch.setattr(train_module, "fit_error_model", counting)
    bundle = DataOptions(spec="digits", batch_size=64, limit_train=1600).load()
    assert len(bundle.train) == 23  # 1438 images / 64
    model = approxctl.convert(TinyConv(1, 10, 8), target)
    trainer = Trainer(
        model, bundle, TrainConfig(epochs=2, finetune=0, val_every=5), device=torch.device("cpu"),
        out=None, convert_fn=None,
    )  # fmt: skip
    approxctl.calibrate(model, [next(iter(bundle.train))[0]])
    trainer.run()
    records = trainer.state.history
    assert [r["calibrations"] for r in records] == [expected_per_epoch] * 2
    assert calls.count(1) == 2 * expected_per_epoch


def _train(tmp_path: Path, *extra: str) -> dict:
    result = runner.invoke(
        app,
        ["train", "tinyconv", "--target", "am", "--data", "digits", "--batch-size", "64",
         "--pretrain", "1", "--epochs", "2", "--finetune", "0.5", "--lr", "0.05",
         "--out", str(tmp_path), "--json", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_short_run_improves_accuracy_and_writes_every_output(tmp_path: Path) -> None:
    doc = _train(tmp_path)
    summary = doc["summary"]
    assert summary["fine_tuning"]["top1"] > 0.5  # from 10% chance on a random TinyConv
    assert summary["error_injection"]["top1"] > 0.5
    assert "inference_only" in summary and "float" in summary
    phases = [(r["phase"], r["fraction"]) for r in doc["history"]]
    assert phases == [("pretrain", 1.0), ("inject", 1.0), ("inject", 1.0), ("finetune", 0.5)]
    outputs = ["model.safetensors", "approx.json", "report.json", "report.md"]
    outputs += ["pretrained.safetensors", "checkpoints/last.pt", "plots/convergence.png"]
    for name in outputs:
        assert (tmp_path / name).is_file(), name
    loaded = approxctl.load(tmp_path)
    assert approxctl.get_mode(loaded) == "float"


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _train(tmp_path / "full")
    from approxctl import train as train_module

    original = train_module.Trainer._run_epoch
    epochs_run = []

    def crash_in_third_epoch(self, phase, mode, epoch, fraction):  # type: ignore[no-untyped-def]
        epochs_run.append((phase, epoch))
        if len(epochs_run) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the second inject epoch
        return original(self, phase, mode, epoch, fraction)

    monkeypatch.setattr(train_module.Trainer, "_run_epoch", crash_in_third_epoch)
    crashed = runner.invoke(
        app,
        ["train", "tinyconv", "--target", "am", "--data", "digits", "--batch-size", "64",
         "--pretrain", "1", "--epochs", "2", "--finetune", "0.5", "--lr", "0.05",
         "--out", str(tmp_path / "resumed"), "--quiet"],
    )  # fmt: skip
    assert crashed.exit_code == 130
    monkeypatch.setattr(train_module.Trainer, "_run_epoch", original)
    resumed = _train(tmp_path / "resumed", "--resume")

    def measured(summary: dict) -> dict:  # everything but wall-clock times
        def strip(v: object) -> object:
            return {m: x for m, x in v.items() if m != "seconds"} if isinstance(v, dict) else v

        return {k: strip(v) for k, v in summary.items()}

    assert measured(resumed["summary"]) == measured(full["summary"])
    a = approxctl.load(tmp_path / "full").state_dict()
    b = approxctl.load(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
