"""Error models for ``inject`` mode (SPEC section 4, paper section 3.2).

Both live in the target's accumulator domain (before the per-channel output scale), so one model
serves every output channel of a layer.

* Type 1, ``PolynomialErrorModel`` (sc, approx-mult): the error ``exact - proxy`` is binned by the
  proxy output v; per-bin mean and standard deviation are fitted by polynomials mu(v), sigma(v);
  the forward adds ``mu(v) + sigma(v) * eps``.
* Type 2, ``GaussianErrorModel`` (analog): one mean and one standard deviation of ``exact - proxy``
  over the whole layer output; the forward adds ``N(mean, std^2)``.

Models are ``nn.Module`` s whose state is buffers, so they travel with ``state_dict``, safetensors
files and checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from approxctl.errors import ApproxError
from approxctl.noise import ChannelLayout, NoiseSpec, add_error, horner

# Samples kept per layer and per batch when recording type-1 statistics.
SAMPLES_PER_BATCH = 1 << 16
NO_BOUNDS = (-float("inf"), float("inf"), float("inf"))


class RunningMoments:
    """Count, mean and standard deviation of a stream of tensors, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().to(torch.float64)
        self.count += t.numel()
        self.total += float(t.sum())
        self.total_sq += float((t * t).sum())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return max(self.total_sq / self.count - self.mean**2, 0.0) ** 0.5


class ErrorModel(nn.Module):
    """Common interface: record (proxy value, error) pairs, fit, then sample injected errors.

    Besides the model itself, fitting stores ``summary`` = (error mean, error std, output std)
    over everything recorded, in the accumulator domain: the layer's emulation error relative to
    its signal, for reports.
    """

    def __init__(self, noise_scale: float = 1.0) -> None:
        super().__init__()
        # Factor on the drawn standard deviation (the target option ``noise_scale``); the mean
        # is always drawn in full. Not a buffer: approx.json's target options carry it.
        self.noise_scale = float(noise_scale)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("summary", torch.zeros(3, dtype=torch.float64))
        self._errors, self._values = RunningMoments(), RunningMoments()
        self._spec: tuple[tuple[object, ...], NoiseSpec] | None = None

    def reset_recording(self) -> None:
        self._errors, self._values = RunningMoments(), RunningMoments()
        self._reset()

    def record(self, v: torch.Tensor, err: torch.Tensor) -> None:
        self._errors.add(err)
        self._values.add(v)
        self._record(v, err)

    def fit_recorded(self) -> None:
        if self._errors.count == 0:
            raise ApproxError(
                "no error samples were recorded; give fit_error_model at least one batch"
            )
        stats = [self._errors.mean, self._errors.std, self._values.std]
        self.summary.copy_(torch.tensor(stats, dtype=torch.float64))
        self._fit()
        self.fitted.fill_(True)
        self.reset_recording()

    def relative_error(self) -> dict[str, float]:
        """Error mean and std over the output's std (0 when the output is constant)."""
        err_mean, err_std, out_std = self.summary.tolist()
        scale = out_std if out_std > 0 else float("inf")
        return {"rel_err_mean": err_mean / scale, "rel_err_std": err_std / scale}

    def _reset(self) -> None:
        raise NotImplementedError

    def _record(self, v: torch.Tensor, err: torch.Tensor) -> None:
        raise NotImplementedError

    def _fit(self) -> None:
        raise NotImplementedError

    def inject(
        self, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, layout: ChannelLayout
    ) -> torch.Tensor:
        """Outputs ``y = v * scale + bias`` plus the error drawn at v, times ``scale``.

        ``scale``/``bias`` broadcast per channel; the gradient passes straight through to y.
        """
        return add_error(y, self.noise_spec(), scale=scale, bias=bias, layout=layout)

    def sample(self, v: torch.Tensor) -> torch.Tensor:
        """The error alone that ``inject`` would add at accumulator values ``v`` (tests, plots)."""
        flat = v.detach().reshape(-1)
        one, zero = torch.ones((), dtype=v.dtype), torch.zeros((), dtype=v.dtype)
        return (self.inject(flat, one, zero, ChannelLayout(1, 1)) - flat).view(v.shape)

    def noise_spec(self) -> NoiseSpec:
        """What ``inject`` draws from, for kernels that fuse the draw into other work: one
        spec (whose kernel constants are built once) for as long as the model's buffers and
        ``noise_scale`` stay what they were."""
        key = self._spec_key()
        if key is None or self._spec is None or self._spec[0] != key:
            spec = self._noise_spec()
            if self.noise_scale != 1.0:
                spec = spec.scaled_std(self.noise_scale)
            self._spec = (key, spec)
        return self._spec[1]

    def _spec_key(self) -> tuple[object, ...] | None:
        """What identifies the buffers' current contents: each one's object, storage and
        version counter (bumped by every in-place write: fits, ``load_state_dict``), read in
        about a microsecond where their values would take tens; None for inference-mode
        tensors, which keep no version counter (the spec is then built every call)."""
        try:
            return (
                self.noise_scale,
                *((id(b), b.data_ptr(), b._version) for b in self.buffers()),
            )
        except RuntimeError:
            return None

    def _noise_spec(self) -> NoiseSpec:
        """The fitted model as it is, before ``noise_scale``."""
        raise NotImplementedError

    def stats(self) -> dict[str, object]:
        raise NotImplementedError


class GaussianErrorModel(ErrorModel):
    """Type 2: one mean and standard deviation of the error over a layer's output."""

    def __init__(self, noise_scale: float = 1.0) -> None:
        super().__init__(noise_scale)
        self.register_buffer("mean", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(0.0, dtype=torch.float64))

    def _reset(self) -> None:
        pass  # the base class's running moments are all this model needs

    def _record(self, v: torch.Tensor, err: torch.Tensor) -> None:
        pass

    def _fit(self) -> None:
        self.mean.fill_(float(self.summary[0]))
        self.std.fill_(float(self.summary[1]))

    def _noise_spec(self) -> NoiseSpec:
        return NoiseSpec(self.mean.view(1), self.std.view(1), -1.0, 1.0)  # constants: degree 0

    def stats(self) -> dict[str, object]:
        return {"kind": "gaussian", "mean": float(self.mean), "std": float(self.std)}


# Fraction of the recorded proxy values left out at each end when choosing the binned range.
TAIL = 1e-3


def fit_binned_polynomials(
    v: np.ndarray, err: np.ndarray, degree: int, bins: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], dict[str, np.ndarray]]:
    """Fit mu(v), sigma(v) to per-bin error statistics (paper Fig. 2).

    Returns coefficients (lowest order first) in the window [-1, 1] mapped from the domain
    ``(lo, hi)`` of v, the domain, and the binned statistics used for the fit (for plots and
    for the bounds the evaluated polynomials are held in).

    The domain is the range of v without its extreme ``TAIL`` fraction at each end: equal-width
    bins over the full range of a long-tailed v leave most bins nearly empty, and a degree-10
    polynomial through a few crowded bins swings far outside the data between and beyond them
    (measured: fitted means 50x the largest binned mean). Values beyond the domain are held at
    its edges when the error is drawn. Bins with fewer than two samples are ignored; the degree
    drops to what the bins support.
    """
    lo, hi = (float(q) for q in np.quantile(v, [TAIL, 1 - TAIL])) if v.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    inside = (v >= lo) & (v <= hi)
    v, err = v[inside], err[inside]
    edges = np.linspace(lo, hi, bins + 1)
    index = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    sum_v = np.bincount(index, weights=v, minlength=bins)
    sum_e = np.bincount(index, weights=err, minlength=bins)
    sum_e2 = np.bincount(index, weights=err * err, minlength=bins)
    keep = count >= 2
    centers = sum_v[keep] / count[keep]
    mu = sum_e[keep] / count[keep]
    sigma = np.sqrt(np.maximum(sum_e2[keep] / count[keep] - mu * mu, 0.0))
    weights = np.sqrt(count[keep])
    deg = max(0, min(degree, int(keep.sum()) - 1))
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    t = (centers - mid) / half
    if keep.sum() == 0:
        mu_all = float(err.mean()) if err.size else 0.0
        std_all = float(err.std()) if err.size else 0.0
        mu_coef, sigma_coef = np.array([mu_all]), np.array([std_all])
        mu, sigma = np.array([mu_all]), np.array([std_all])
    else:
        mu_coef = np.polynomial.polynomial.polyfit(t, mu, deg, w=weights)
        sigma_coef = np.polynomial.polynomial.polyfit(t, sigma, deg, w=weights)
    binned = {"v": centers, "mean": mu, "std": sigma, "count": count[keep]}
    return mu_coef, sigma_coef, (lo, hi), binned


class PolynomialErrorModel(ErrorModel):
    """Type 1: error mean and std as polynomials of the proxy output v."""

    def __init__(self, degree: int = 10, bins: int = 30, noise_scale: float = 1.0) -> None:
        super().__init__(noise_scale)
        self.degree = degree
        self.bins = bins
        self.register_buffer("mu_coef", torch.zeros(degree + 1, dtype=torch.float64))
        self.register_buffer("sigma_coef", torch.zeros(degree + 1, dtype=torch.float64))
        self.register_buffer("domain", torch.tensor([-1.0, 1.0], dtype=torch.float64))
        # (mu_min, mu_max, sigma_max): the range of the binned statistics of the last fit.
        self.register_buffer("bounds", torch.tensor(NO_BOUNDS, dtype=torch.float64))
        self._samples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.binned: dict[str, np.ndarray] | None = None

    def _reset(self) -> None:
        self._samples = []

    def _record(self, v: torch.Tensor, err: torch.Tensor) -> None:
        v = v.detach().reshape(-1)
        err = err.detach().reshape(-1)
        if v.numel() > SAMPLES_PER_BATCH:
            # A fixed stride keeps the choice deterministic and spread over the whole output.
            step = v.numel() // SAMPLES_PER_BATCH
            v, err = v[::step], err[::step]
        self._samples.append((v.to("cpu", torch.float64), err.to("cpu", torch.float64)))

    def _fit(self) -> None:
        v = torch.cat([s[0] for s in self._samples]).numpy()
        err = torch.cat([s[1] for s in self._samples]).numpy()
        mu, sigma, (lo, hi), binned = fit_binned_polynomials(v, err, self.degree, self.bins)
        self.mu_coef.zero_()
        self.sigma_coef.zero_()
        self.mu_coef[: len(mu)] = torch.from_numpy(mu)
        self.sigma_coef[: len(sigma)] = torch.from_numpy(sigma)
        self.domain.copy_(torch.tensor([lo, hi], dtype=torch.float64))
        bounds = [float(binned["mean"].min()), float(binned["mean"].max()),
                  float(binned["std"].max())] if len(binned["mean"]) else NO_BOUNDS  # fmt: skip
        self.bounds.copy_(torch.tensor(bounds, dtype=torch.float64))
        self.binned = binned

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Models saved before the bounds existed load unbounded, as they were fitted.
        state_dict.setdefault(prefix + "bounds", torch.tensor(NO_BOUNDS, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _window(self, v: torch.Tensor) -> torch.Tensor:
        lo, hi = self.domain.tolist()
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        # Outside the fitted range a degree-10 polynomial explodes; hold the edge values instead.
        return (v.clamp(lo, hi) - mid) / half

    def mean_at(self, v: torch.Tensor) -> torch.Tensor:
        mu_min, mu_max, _ = self.bounds.tolist()
        return horner(self.mu_coef, self._window(v)).clamp_(mu_min, mu_max)

    def std_at(self, v: torch.Tensor) -> torch.Tensor:
        return horner(self.sigma_coef, self._window(v)).clamp_(0, float(self.bounds[2]))

    def _noise_spec(self) -> NoiseSpec:
        lo, hi = self.domain.tolist()
        mu_min, mu_max, sigma_max = self.bounds.tolist()
        return NoiseSpec(self.mu_coef, self.sigma_coef, lo, hi, mu_min, mu_max, sigma_max)

    def stats(self) -> dict[str, object]:
        return {
            "kind": "polynomial",
            "domain": self.domain.tolist(),
            "mu_coef": self.mu_coef.tolist(),
            "sigma_coef": self.sigma_coef.tolist(),
            # JSON has no infinity: an unbounded side (a model fitted before bounds) is null.
            "bounds": [b if math.isfinite(b) else None for b in self.bounds.tolist()],
        }


def make_error_model(kind: str, degree: int, bins: int, noise_scale: float = 1.0) -> ErrorModel:
    if kind == "poly":
        return PolynomialErrorModel(degree, bins, noise_scale)
    if kind == "gaussian":
        return GaussianErrorModel(noise_scale)
    raise ValueError(f"unknown error model kind {kind!r}")
