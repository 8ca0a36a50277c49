"""Re-estimating BatchNorm statistics in a chosen mode (``approxctl.recalibrate_batchnorm``,
``train --bn-recalib``): precise averages over the given batches, nothing else touched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import approxctl
from approxctl.cli import app
from approxctl.evaluate import evaluate
from approxctl.models import TinyConv
from approxctl.pipeline import DataOptions

runner = CliRunner()


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _converted(target: str = "am") -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    model = approxctl.convert(TinyConv(1, 10, 8), target)
    approxctl.calibrate(model, batches)
    return model, batches


def _batch_statistics(model: nn.Module, batches: list[torch.Tensor], mode: str) -> list:
    """Each BatchNorm input's per-channel mean and unbiased variance, per batch, taken in
    training mode (where every BatchNorm normalizes by its batch) in ``mode``."""
    probe = copy.deepcopy(model)
    approxctl.set_mode(probe, mode)
    probe.train()
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, m in enumerate(_norms(probe)):
        m.register_forward_pre_hook(
            lambda _m, args, i=i: seen.setdefault(i, []).append(
                (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=True))
            )
        )
    with torch.no_grad():
        for x in batches:
            probe(x)
    return [seen[i] for i in range(len(_norms(probe)))]


def test_statistics_become_the_average_over_the_batches_in_the_given_mode() -> None:
    model, batches = _converted()
    approxctl.set_mode(model, "inject")
    model.eval()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    momenta = [m.momentum for m in _norms(model)]
    approxctl.recalibrate_batchnorm(model, batches, mode="exact")
    expected = _batch_statistics(model, batches, "exact")
    for m, stats in zip(_norms(model), expected, strict=True):
        mean = torch.stack([s[0] for s in stats]).mean(0)
        var = torch.stack([s[1] for s in stats]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
    # Nothing else changed: weights, the layers' mode, train/eval, momentum.
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert approxctl.get_mode(model) == "inject" and not model.training
    assert [m.momentum for m in _norms(model)] == momenta


def test_the_mode_matters_and_a_model_without_batchnorm_is_left_alone() -> None:
    model, batches = _converted("sc")  # SC's exact output is far from its float output
    exact = copy.deepcopy(model)
    approxctl.recalibrate_batchnorm(exact, batches, mode="exact")
    approxctl.recalibrate_batchnorm(model, batches, mode="float")
    first = _norms(model)[0].running_var, _norms(exact)[0].running_var
    assert not torch.allclose(*first, rtol=1e-3)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    assert approxctl.recalibrate_batchnorm(plain, batches) is plain


def test_dropout_stays_off_while_statistics_are_gathered() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4))
    x = torch.randn(32, 1, 8, 8)
    approxctl.recalibrate_batchnorm(model, [x])  # no approximate layers: mode plays no part
    z = model[0](x).detach()
    torch.testing.assert_close(model[2].running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(model[2].running_var, z.var((0, 2, 3), unbiased=True))
    assert model.training and model[1].training  # as it was


def test_statistics_survive_a_failing_batch() -> None:
    model, batches = _converted()
    before = [m.running_mean.clone() for m in _norms(model)]
    with pytest.raises(RuntimeError):
        approxctl.recalibrate_batchnorm(model, [batches[0], torch.randn(16, 3, 8, 8)])
    assert all(torch.equal(m.running_mean, b) for m, b in zip(_norms(model), before, strict=True))


def _train(out: Path, *extra: str) -> dict:
    result = runner.invoke(
        app,
        ["train", "tinyconv", "--target", "am", "--data", "digits", "--batch-size", "64",
         "--limit-train", "640", "--pretrain", "1", "--epochs", "1", "--finetune", "0.5",
         "--lr", "0.05", "--out", str(out), "--json", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_training_with_bn_recalib_validates_on_recalibrated_statistics(tmp_path: Path) -> None:
    doc = _train(tmp_path / "recal", "--bn-recalib", "2")
    plain = _train(tmp_path / "plain")
    # 'Inference only' is the float model on the hardware as it is: never recalibrated.
    assert doc["summary"]["inference_only"]["top1"] == plain["summary"]["inference_only"]["top1"]
    assert doc["summary"]["inference_only"]["loss"] == plain["summary"]["inference_only"]["loss"]
    model = approxctl.load(tmp_path / "recal")
    saved = [m.running_var.clone() for m in _norms(model)]
    # The saved statistics are those of the last validation: recalibrating the final weights
    # on the same two batches (one fixed shuffle of the training set) gives them again ...
    bundle = DataOptions(spec="digits", batch_size=64, limit_train=640).load()
    order = torch.randperm(len(bundle.train.dataset), generator=torch.Generator().manual_seed(0))
    batches = [torch.stack([bundle.train.dataset[int(i)][0] for i in order[j : j + 64]])
               for j in (0, 64)]  # fmt: skip
    approxctl.recalibrate_batchnorm(model, batches, mode="exact")
    for m, var in zip(_norms(model), saved, strict=True):
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
    # ... and so is the reported accuracy.
    result = evaluate(model, bundle.val, mode="exact", layer_errors=False)
    assert result.top1 == doc["summary"]["fine_tuning"]["top1"]
    # Recalibrating changes no training step (training normalizes by batch statistics): the
    # run without it has the same weights, and training's running averages, which differ.
    other = approxctl.load(tmp_path / "plain")
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[k]) for k, p in other.named_parameters())
    assert not all(
        torch.allclose(a.running_var, b, rtol=1e-3)
        for a, b in zip(_norms(other), saved, strict=True)
    )
