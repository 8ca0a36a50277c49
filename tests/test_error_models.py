"""Fitting the type-1 error model (SPEC section 4, paper Fig. 2) robustly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from approxctl.error_models import (
    TAIL,
    GaussianErrorModel,
    PolynomialErrorModel,
    fit_binned_polynomials,
)
from approxctl.noise import ChannelLayout, NoiseSpec, add_error, channel_values, channel_vector


def _long_tailed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Proxy values with a heavy tail (like a layer's outputs) and an error that grows with v."""
    rng = np.random.default_rng(seed)
    v = rng.standard_t(2, n) * 100.0
    err = 0.05 * v + rng.normal(0, 1 + 0.01 * np.abs(v), n)
    return v, err


def test_fit_range_leaves_out_the_extreme_tails() -> None:
    v, err = _long_tailed(200_000, 0)
    _, _, (lo, hi), binned = fit_binned_polynomials(v, err, 10, 30)
    assert lo == pytest.approx(np.quantile(v, TAIL))
    assert hi == pytest.approx(np.quantile(v, 1 - TAIL))
    assert v.min() < lo and hi < v.max()
    assert binned["count"].min() >= 20  # every bin is populated, not just the central few


def test_fitted_model_stays_within_its_binned_statistics() -> None:
    """A degree-10 polynomial through binned statistics of a long-tailed v must not swing far
    outside them (the unbounded fit overshot the largest binned mean 50x on TinyConv)."""
    v, err = _long_tailed(300_000, 1)
    model = PolynomialErrorModel(10, 30)
    model.record(torch.from_numpy(v), torch.from_numpy(err))
    model.fit_recorded()
    binned = model.binned
    assert binned is not None
    grid = torch.linspace(float(v.min()) * 2, float(v.max()) * 2, 100_001, dtype=torch.float64)
    mean, std = model.mean_at(grid), model.std_at(grid)
    assert float(mean.min()) >= binned["mean"].min() - 1e-9
    assert float(mean.max()) <= binned["mean"].max() + 1e-9
    assert float(std.min()) >= 0 and float(std.max()) <= binned["std"].max() + 1e-9
    # ... while still following the data inside the range.
    crowded = binned["count"] >= 1000
    fitted = model.mean_at(torch.from_numpy(binned["v"][crowded])).numpy()
    spread = binned["mean"].max() - binned["mean"].min()
    assert np.abs(fitted - binned["mean"][crowded]).max() < 0.05 * spread


@pytest.mark.parametrize("fused", [True, False])
def test_drawn_error_respects_the_bounds(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    if not fused:
        monkeypatch.setattr("approxctl.noise.cpu_pointwise", None)
    spec = NoiseSpec(
        torch.tensor([0.0, 10.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64),
        -1.0, 1.0, mu_min=-2.0, mu_max=3.0, sigma_max=0.0,
    )  # fmt: skip
    y = torch.linspace(-1, 1, 1001)
    err = add_error(y, spec, scale=torch.ones(()), bias=torch.zeros(()), layout=ChannelLayout(1, 1))
    err = err - y
    torch.testing.assert_close(err, (10 * y).clamp(-2, 3), rtol=0, atol=1e-5)


def test_models_saved_without_bounds_load_unbounded() -> None:
    model = PolynomialErrorModel(10, 30)
    v, err = _long_tailed(50_000, 2)
    model.record(torch.from_numpy(v), torch.from_numpy(err))
    model.fit_recorded()
    state = model.state_dict()
    del state["bounds"]
    again = PolynomialErrorModel(10, 30)
    again.load_state_dict(state)
    assert again.bounds.tolist() == [-float("inf"), float("inf"), float("inf")]
    assert torch.equal(again.mu_coef, model.mu_coef)


def test_stats_are_strict_json_even_unbounded() -> None:
    import json

    model = PolynomialErrorModel(4, 10)
    assert model.stats()["bounds"] == [None, None, None]
    json.dumps(model.stats(), allow_nan=False)


@pytest.mark.parametrize("fused", [True, False])
def test_noise_scale_multiplies_the_drawn_deviation_only(
    monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """The target option ``noise_scale``: the same draws, their deviation from mu(v) times
    the factor; 0 leaves exactly the mean."""
    if not fused:
        monkeypatch.setattr("approxctl.noise.cpu_pointwise", None)
    v, err = _long_tailed(50_000, 3)
    models = {}
    for scale in (1.0, 0.5, 0.0):
        models[scale] = PolynomialErrorModel(10, 30, noise_scale=scale)
        models[scale].record(torch.from_numpy(v), torch.from_numpy(err))
        models[scale].fit_recorded()
    grid = torch.linspace(float(np.quantile(v, 0.01)), float(np.quantile(v, 0.99)), 20_001)
    mean = models[1.0].mean_at(grid.double()).float()
    draws = {}
    for scale, model in models.items():
        torch.manual_seed(7)
        draws[scale] = model.sample(grid)
    deviation = draws[1.0] - mean
    assert float(deviation.std()) > 1.0  # the fitted model does draw noise
    torch.testing.assert_close(draws[0.5] - mean, 0.5 * deviation, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(draws[0.0], mean, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad", [-0.1, 10.5, float("nan"), True, "half"])
def test_noise_scale_is_validated(bad: object) -> None:
    from approxctl.errors import ApproxError
    from approxctl.targets import ScConfig

    with pytest.raises(ApproxError, match="noise_scale"):
        ScConfig.with_options(noise_scale=bad)


def test_noise_scale_travels_with_a_saved_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import approxctl
    from approxctl.models import TinyConv

    model = approxctl.convert(TinyConv(1, 10, 8), "analog", noise_scale=0.25)
    approxctl.calibrate(model, [torch.randn(8, 1, 8, 8)])
    approxctl.save(model, tmp_path)
    loaded = approxctl.load(tmp_path, model=TinyConv(1, 10, 8))
    assert {layer.error_model.noise_scale for _, layer in approxctl.approx_layers(loaded)} == {0.25}


def test_noise_spec_is_reused_until_the_model_or_its_noise_scale_changes() -> None:
    """Inject layers take one spec per call; it (and its kernel constants) is built again only
    when a buffer's value, device or dtype, or ``noise_scale``, differs from last time."""
    model = GaussianErrorModel()
    model.mean.fill_(0.5)
    model.std.fill_(2.0)
    first = model.noise_spec()
    assert model.noise_spec() is first
    constants = first.kernel_args()[1:]
    assert first.kernel_args()[1] is constants[0]  # built once per spec
    model.std.fill_(3.0)  # a refit writes the buffers in place
    refit = model.noise_spec()
    assert refit is not first and float(refit.sigma_coef[0]) == 3.0
    model.noise_scale = 0.5
    scaled = model.noise_spec()
    assert float(scaled.sigma_coef[0]) == 1.5 and model.noise_spec() is scaled
    model.load_state_dict({**model.state_dict(), "mean": torch.tensor(-1.0, dtype=torch.float64)})
    assert float(model.noise_spec().mu_coef[0]) == -1.0


@pytest.mark.parametrize(
    "value", [0.0, 2.5, torch.tensor(3.0), torch.arange(4.0).view(4, 1, 1), torch.arange(4.0)]
)
def test_channel_vector_is_channel_values_as_numpy(value: torch.Tensor | float) -> None:
    got = channel_vector(value, 4)
    assert got.dtype == np.float32 and got.shape == (4,)
    assert np.array_equal(got, channel_values(value, 4).numpy())
