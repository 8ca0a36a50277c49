"""Drawing the injected error of ``inject`` mode (SPEC section 4) quickly and reproducibly.

A layer's float outputs are ``y = v * scale + bias`` (v in the accumulator domain, one scale and
bias per channel). The error drawn at v is ``mu(t) + max(sigma(t), 0) * eps``, t = clamp(v) mapped
onto the polynomials' window [-1, 1], ``eps ~ N(0, 1)``, and it is added times ``scale``; the
gradient passes straight through.

On CPU (float32) numba kernels draw it in the same pass that computes the proxy activation
(``approxctl.proxy_ops``), or in one pass of its own (``add_error``); on CUDA (float32, CuPy
installed) CUDA kernels do the same (``approxctl.backends.cuda_pointwise``, one hash per
element, so their draws differ from the CPU's, not their distribution). Their normal samples come
from inverse-CDF sampling over 2^12 equiprobable quantiles of N(0, 1) (rescaled to exactly unit
variance), picked by a 32-bit counter hash of the element's index and a key drawn from torch's
generator, so ``torch.manual_seed`` makes runs reproducible and threading cannot change them. The
distribution is the normal one discretized to 4096 levels, tails cut at 3.67 sigma (probability
2.4e-4). On other devices and dtypes: torch.randn and torch ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    from approxctl.backends import cpu_pointwise
except ImportError:  # numba missing: the torch path below serves every device
    cpu_pointwise = None  # type: ignore[assignment]

TABLE_BITS = 12


@functools.cache
def normal_quantiles() -> torch.Tensor:
    """The 2^12 quantiles of N(0,1) at (j + 0.5) / 2^12, rescaled to zero mean, unit variance."""
    n = 1 << TABLE_BITS
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = torch.special.ndtri(p)
    return ((q - q.mean()) / q.std(unbiased=False)).to(torch.float32)


def horner(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    values = coef.tolist()
    out = torch.full_like(t, values[-1])
    for c in reversed(values[:-1]):
        out.mul_(t).add_(c)
    return out


@dataclass(frozen=True)
class ChannelLayout:
    """How per-channel ``scale``/``bias`` vectors map onto a contiguous output."""

    channels: int
    inner: int  # elements per (sample, channel): H*W for a conv, 1 for a linear layer


@dataclass(frozen=True)
class NoiseSpec:
    """An error model's polynomials (lowest order first) on the domain ``(lo, hi)`` of v, and
    the bounds the evaluated polynomials are held in: ``mu_min <= mu <= mu_max`` and
    ``0 <= sigma <= sigma_max`` (the range of the binned statistics they were fitted to).

    The type-2 Gaussian model is the degree-0 case: constant mean and standard deviation.
    """

    mu_coef: torch.Tensor
    sigma_coef: torch.Tensor
    lo: float
    hi: float
    mu_min: float = -math.inf
    mu_max: float = math.inf
    sigma_max: float = math.inf

    def __post_init__(self) -> None:
        if not self.hi > self.lo:  # a degenerate domain: any window maps the constant value
            object.__setattr__(self, "hi", self.lo + 1.0)

    def scaled_std(self, factor: float) -> NoiseSpec:
        """The same model with the standard deviation (and its bound) times ``factor``."""
        return dataclasses.replace(
            self, sigma_coef=self.sigma_coef * factor, sigma_max=self.sigma_max * factor
        )

    def kernel_args(self) -> tuple[Any, ...]:
        """The noise arguments of the cpu_pointwise kernels, with a fresh key drawn from torch's
        generator: (key, mu, sigma, lo, hi, bounds, quantile table, hash shift)."""
        return (np.uint32(draw_key()), *self._kernel_constants)

    @functools.cached_property
    def _kernel_constants(self) -> tuple[Any, ...]:
        """``kernel_args`` but the key, built once per spec (about 50 us a call otherwise, a
        fixed cost of every inject layer call; error models hand out one spec until refit)."""
        return (
            *padded_coefficients(self.mu_coef, self.sigma_coef),
            np.float32(self.lo),
            np.float32(self.hi),
            np.array([self.mu_min, self.mu_max, self.sigma_max], dtype=np.float32),
            normal_quantiles().numpy(),
            np.uint32(32 - TABLE_BITS),
        )

    def draw_torch(self, v: torch.Tensor) -> torch.Tensor:
        """The error at accumulator values ``v``, with torch ops (any device and dtype)."""
        lo, hi = self.lo, self.hi
        t = (v.clamp(lo, hi) - (lo + hi) / 2) * (2 / (hi - lo))
        sigma = horner(self.sigma_coef, t).clamp_(0, self.sigma_max)
        mu = horner(self.mu_coef, t).clamp_(self.mu_min, self.mu_max)
        return sigma.mul_(torch.randn_like(t)).add_(mu)


def padded_coefficients(*polys: torch.Tensor) -> list[tuple[np.float32, ...]]:
    """The polynomials as tuples of float32 of one common length, 1 + a multiple of 4 (zeros on
    top, which leave Horner's rule exact), as the kernels take them. numba compiles one version
    per length, whose Horner loop unrolls; rounding the length up keeps those versions few
    (1, 5, 9, 13 coefficients: degree 10, the default, shares one with degrees 9 to 12), at the
    cost of two idle steps of Horner's rule, within the spread of `benchmarks/bench_noise.py`."""
    degree = max(len(p) for p in polys) - 1
    size = 4 * -(-degree // 4) + 1
    out = []
    for p in polys:
        values = np.zeros(size, dtype=np.float32)
        values[: len(p)] = p.detach().cpu().numpy()
        out.append(tuple(values))
    return out


def draw_key() -> int:
    """A fresh 32-bit key for the kernels' counter hash, from torch's (CPU) generator, so
    ``torch.manual_seed`` makes the draws reproducible on every device."""
    return int(torch.randint(0, 2**32, (1,)).item())


def channel_values(
    t: torch.Tensor | float, channels: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A scalar or per-channel scale/bias as a contiguous float32 (C,) tensor on ``device``."""
    t = torch.as_tensor(t, device=device)
    return t.detach().to(torch.float32).reshape(-1).expand(channels).contiguous()


def channel_vector(t: torch.Tensor | float, channels: int) -> np.ndarray:
    """``channel_values`` as a numpy array, for the CPU kernels."""
    if isinstance(t, (int, float)):  # a bias of 0.0 (none): no tensor round trip
        return np.full(channels, t, dtype=np.float32)
    if t.numel() == channels and t.dtype == torch.float32 and t.device.type == "cpu":
        return t.detach().reshape(-1).contiguous().numpy()
    return channel_values(t, channels).numpy()


def use_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the numba pointwise kernels serve these tensors (CPU float32)."""
    return cpu_pointwise is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


class _AddError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, spec, scale, bias, layout, inplace):  # type: ignore[no-untyped-def]
        from approxctl.backends import cuda_pointwise  # imports this module

        if cuda_pointwise.usable(y) and y.is_contiguous():
            out = y if inplace else torch.empty_like(y)
            if inplace:
                ctx.mark_dirty(y)
            cuda_pointwise.add_error(y, out, spec, scale, bias, layout)
            return out
        if use_kernels(y) and y.is_contiguous():
            out = y if inplace else torch.empty_like(y)
            if inplace:
                ctx.mark_dirty(y)
            cpu_pointwise.add_noise(
                y.detach().view(-1).numpy(), *spec.kernel_args(),
                channel_vector(scale, layout.channels), channel_vector(bias, layout.channels),
                layout.inner, out.detach().view(-1).numpy(),
            )  # fmt: skip
            return out
        v = (y.detach() - bias) / scale
        err = spec.draw_torch(v) * scale
        if inplace:
            ctx.mark_dirty(y)
            return y.add_(err)
        return y + err

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad, None, None, None, None, None


def add_error(
    y: torch.Tensor,
    spec: NoiseSpec,
    *,
    scale: torch.Tensor,
    bias: torch.Tensor,
    layout: ChannelLayout,
    inplace: bool = False,
) -> torch.Tensor:
    """``y`` plus the error drawn at ``v = (y - bias) / scale``, times ``scale``.

    ``scale``/``bias`` broadcast against ``y`` per channel. ``inplace`` adds to ``y`` itself
    (saving an allocation): only for a ``y`` that no autograd node saved for its backward.
    """
    return _AddError.apply(y, spec, scale, bias, layout, inplace)
