"""Drawing the injected error of ``inject`` mode (SPEC section 4) quickly and reproducibly.

``add_error(y, ...)`` works on a layer's float outputs ``y = v * scale + bias`` (v in the
accumulator domain, one scale and bias per channel) and returns
``y + (mu(t) + max(sigma(t), 0) * eps) * scale`` with ``t = clamp(v)`` mapped onto the polynomials'
window and ``eps ~ N(0, 1)``; the gradient passes straight through to ``y``.

On CPU one fused numba pass does it all. Its normal samples come from inverse-CDF sampling over
2^16 equiprobable quantiles of N(0, 1) (rescaled to exactly unit variance), indexed by a counter
hash of a seed drawn from torch's generator — so ``torch.manual_seed`` makes runs reproducible and
threading cannot change them. The distribution is the normal one discretized to 65536 levels, with
tails cut at 4.3 sigma (probability 2e-5). On other devices: torch.randn and torch ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    from approxctl.backends import cpu_kernels
except ImportError:  # numba missing: the torch path below serves every device
    cpu_kernels = None  # type: ignore[assignment]

TABLE_BITS = 12


@functools.cache
def normal_quantiles() -> torch.Tensor:
    """The 2^16 quantiles of N(0,1) at (j + 0.5) / 2^16, rescaled to zero mean, unit variance."""
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


def _error_torch(
    y: torch.Tensor,
    mu_coef: torch.Tensor,
    sigma_coef: torch.Tensor,
    domain: tuple[float, float],
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    lo, hi = domain
    v = (y - bias) / scale
    t = (v.clamp(lo, hi) - (lo + hi) / 2) * (2 / (hi - lo))
    err = horner(sigma_coef, t).clamp_(min=0).mul_(torch.randn_like(t)).add_(horner(mu_coef, t))
    return err * scale


class _AddError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mu_coef, sigma_coef, lo, hi, scale, bias, layout):  # type: ignore[no-untyped-def]
        if y.device.type == "cpu" and cpu_kernels is not None and y.dtype == torch.float32:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's RNG drives the hash
            flat = y.detach().contiguous().view(-1)
            out = torch.empty_like(flat)

            def vector(t: torch.Tensor) -> torch.Tensor:  # scalar or per-channel -> (C,)
                return t.detach().float().reshape(-1).expand(layout.channels).contiguous()

            cpu_kernels.add_poly_noise(
                flat.numpy(), mu_coef.float().numpy(), sigma_coef.float().numpy(),
                float(lo), float(hi), seed, normal_quantiles().numpy(),
                vector(scale).numpy(), vector(bias).numpy(), layout.inner, out.numpy(),
            )  # fmt: skip
            return out.view(y.shape)
        return y + _error_torch(y.detach(), mu_coef, sigma_coef, (lo, hi), scale, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad, None, None, None, None, None, None, None


def add_error(
    y: torch.Tensor,
    mu_coef: torch.Tensor,
    sigma_coef: torch.Tensor,
    domain: tuple[float, float],
    *,
    scale: torch.Tensor,
    bias: torch.Tensor,
    layout: ChannelLayout,
) -> torch.Tensor:
    """``y`` plus the drawn error; ``scale``/``bias`` broadcast against ``y`` per channel."""
    lo, hi = domain
    if hi <= lo:
        hi = lo + 1.0
    return _AddError.apply(y, mu_coef.cpu(), sigma_coef.cpu(), lo, hi, scale, bias, layout)
