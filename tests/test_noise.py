"""Injected-error sampling (SPEC section 4) and the fused proxy pieces."""

from __future__ import annotations

import numba
import pytest
import torch

from approxctl import noise
from approxctl.noise import ChannelLayout, add_error, normal_quantiles
from approxctl.proxy_ops import hardtanh_pair, sc_activation, straight_through


def test_quantile_table_is_a_standard_normal() -> None:
    q = normal_quantiles().double()
    assert abs(float(q.mean())) < 1e-9
    assert float(q.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    assert bool((q[1:] > q[:-1]).all())
    assert torch.allclose(q, -q.flip(0), atol=1e-6)


def _draw(y: torch.Tensor, mu: list[float], sigma: list[float], **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    scale = kwargs.pop("scale", torch.ones(()))
    bias = kwargs.pop("bias", torch.zeros(()))
    layout = kwargs.pop("layout", ChannelLayout(1, 1))
    domain = kwargs.pop("domain", (-1.0, 1.0))
    mu_t = torch.tensor(mu, dtype=torch.float64)
    sigma_t = torch.tensor(sigma, dtype=torch.float64)
    return add_error(y, mu_t, sigma_t, domain, scale=scale, bias=bias, layout=layout)


def test_constant_model_has_the_asked_mean_std_and_gaussian_shape() -> None:
    torch.manual_seed(1)
    y = torch.zeros(1 << 21)
    e = (_draw(y, [0.25], [2.0]) - y).double()
    assert float(e.mean()) == pytest.approx(0.25, abs=0.01)
    assert float(e.std()) == pytest.approx(2.0, rel=0.005)
    z = (e - 0.25) / 2.0
    assert float((z**4).mean()) == pytest.approx(3.0, abs=0.05)  # normal kurtosis
    # Kolmogorov distance to N(0, 1) at a few points.
    for point in (-2.0, -1.0, 0.0, 0.5, 1.5):
        empirical = float((z <= point).double().mean())
        exact = float(torch.special.ndtr(torch.tensor(point, dtype=torch.float64)))
        assert abs(empirical - exact) < 2e-3


def test_polynomial_mean_follows_the_accumulator_value_per_channel() -> None:
    """With sigma = 0 the error is mu(t) * scale, t = clamp((y - bias) / scale) on [-1, 1]."""
    torch.manual_seed(0)
    y = torch.randn(4, 3, 5, 5) * 3
    scale = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    bias = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)
    mu = [0.1, -0.5, 0.25, 0.02]
    out = _draw(
        y, mu, [0.0], scale=scale, bias=bias, layout=ChannelLayout(3, 25), domain=(-2.0, 2.0)
    )
    t = ((y - bias) / scale).clamp(-2, 2) / 2
    expected = y + sum(c * t**i for i, c in enumerate(mu)) * scale
    assert torch.allclose(out, expected, atol=1e-5)


def test_cpu_kernel_and_torch_path_agree_in_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    y = torch.linspace(-1, 1, 1 << 20)
    torch.manual_seed(2)
    fast = _draw(y, [0.0, 0.3], [0.1, 0.05]) - y
    monkeypatch.setattr(noise, "cpu_kernels", None)
    torch.manual_seed(2)
    slow = _draw(y, [0.0, 0.3], [0.1, 0.05]) - y
    for lo, hi in ((-1.0, -0.5), (0.5, 1.0)):
        inside = (y >= lo) & (y < hi)
        assert float(fast[inside].mean()) == pytest.approx(float(slow[inside].mean()), abs=2e-3)
        assert float(fast[inside].std()) == pytest.approx(float(slow[inside].std()), rel=0.02)


def test_draws_are_reproducible_and_independent_of_threads() -> None:
    y = torch.randn(300_000)
    runs = []
    for threads in (1, 2, 1):
        numba.set_num_threads(threads)
        torch.manual_seed(7)
        runs.append(_draw(y, [0.0], [1.0]))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    torch.manual_seed(8)
    assert not torch.equal(runs[0], _draw(y, [0.0], [1.0]))


def test_injected_error_is_straight_through() -> None:
    y = torch.randn(100, requires_grad=True)
    _draw(y, [0.5], [1.0]).sum().backward()
    assert torch.equal(y.grad, torch.ones(100))


# ------------------------------------------------------------------- proxy ops
def test_sc_activation_matches_the_formula_and_gradcheck() -> None:
    z_pos = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    z_neg = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    bias = torch.randn(1, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    out = sc_activation(z_pos, z_neg, scale, bias)
    spec = ((1 - torch.exp(-z_pos)) - (1 - torch.exp(-z_neg))) * scale + bias
    assert torch.allclose(out, spec)
    assert torch.autograd.gradcheck(
        lambda p, n, b: sc_activation(p, n, scale, b), (z_pos, z_neg, bias)
    )


def test_hardtanh_pair_matches_the_formula_and_gradcheck() -> None:
    z_pos = (torch.rand(5, 6, dtype=torch.float64) * 4 - 1).requires_grad_()
    z_neg = (torch.rand(5, 6, dtype=torch.float64) * 4 - 1).requires_grad_()
    scale = torch.rand(6, dtype=torch.float64) + 0.5
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = hardtanh_pair(z_pos, z_neg, 2.0, scale, bias)
    spec = (z_pos.clamp(0, 2) - z_neg.clamp(0, 2)) * scale + bias
    assert torch.allclose(out, spec)
    assert torch.autograd.gradcheck(
        lambda p, n, b: hardtanh_pair(p, n, 2.0, scale, b), (z_pos, z_neg, bias)
    )


def test_straight_through_forwards_the_value_exactly() -> None:
    proxy = torch.randn(10, requires_grad=True)
    exact, scale, bias = torch.randn(10), torch.tensor(0.5), torch.tensor(2.0)
    out = straight_through(proxy, exact, scale, bias)
    assert torch.equal(out, exact * scale + bias)
    out.relu_()  # in-place ops after a layer (ReLU(inplace=True)) must work
    (out * 3).sum().backward()
    assert torch.equal(proxy.grad, torch.where(out > 0, 3.0, 0.0))
