"""Injected-error sampling (SPEC section 4) and the fused proxy pieces."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from approxctl import noise
from approxctl.backends import cpu_pointwise
from approxctl.noise import ChannelLayout, NoiseSpec, add_error, normal_quantiles
from approxctl.proxy_ops import hardtanh_pair, hardtanh_pairs, sc_activation, straight_through


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
    spec = NoiseSpec(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64), *domain
    )
    return add_error(y, spec, scale=scale, bias=bias, layout=layout, **kwargs)


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


@pytest.mark.parametrize(
    ("mu", "sigma"),
    [
        ([0.1, -0.5, 0.25, 0.02], [0.0]),
        ([0.3], [0.0, 0.0, 0.0]),  # the shorter polynomial is padded to the longer one's length
        ([0.05, -0.2, 0.1, 0.3, -0.1, 0.02, 0.04, -0.03, 0.01, 0.02, -0.01], [0.0] * 11),
    ],
)
def test_polynomial_mean_follows_the_accumulator_value_per_channel(
    mu: list[float], sigma: list[float]
) -> None:
    """With sigma = 0 the error is mu(t) * scale, t = clamp((y - bias) / scale) on [-1, 1]."""
    torch.manual_seed(0)
    y = torch.randn(4, 3, 5, 5) * 3
    scale = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    bias = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)
    out = _draw(
        y, mu, sigma, scale=scale, bias=bias, layout=ChannelLayout(3, 25), domain=(-2.0, 2.0)
    )
    t = ((y - bias) / scale).clamp(-2, 2) / 2
    expected = y + sum(c * t**i for i, c in enumerate(mu)) * scale
    assert torch.allclose(out, expected, atol=1e-5)


def test_cpu_kernel_and_torch_path_agree_in_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    y = torch.linspace(-1, 1, 1 << 20)
    torch.manual_seed(2)
    fast = _draw(y, [0.0, 0.3], [0.1, 0.05]) - y
    monkeypatch.setattr(noise, "cpu_pointwise", None)
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


@pytest.mark.parametrize("inner", [50, 1500])  # the error in a pass of its own, or fused
def test_in_place_draw_equals_the_out_of_place_one(inner: int) -> None:
    y = torch.randn(3, 4, inner)
    layout, scale = ChannelLayout(4, inner), torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1)
    torch.manual_seed(3)
    fresh = _draw(y, [0.1, 0.2], [0.3, 0.1], scale=scale, layout=layout)
    torch.manual_seed(3)
    same = y.clone()
    out = _draw(same, [0.1, 0.2], [0.3, 0.1], scale=scale, layout=layout, inplace=True)
    assert out.data_ptr() == same.data_ptr()
    assert torch.equal(out, fresh)


# ------------------------------------------------------- fused CPU proxy kernels
def test_kernel_exp_is_accurate_over_the_whole_range() -> None:
    """The kernels' own exp(-z), read from the e+ it keeps for the backward."""
    z = np.concatenate([np.linspace(0, 90, 200_001), [-1e-3, 0.0, 1e-30, 1e-7, np.inf]])
    z = z.astype(np.float32)
    e_pos, e_neg, out = np.empty_like(z), np.empty_like(z), np.empty_like(z)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    cpu_pointwise.sc_proxy_forward(
        z, z, one, zero, 1, False, np.uint32(0), zero, zero, np.float32(-1), np.float32(1),
        np.array([-np.inf, np.inf, np.inf], np.float32), normal_quantiles().numpy(),
        np.uint32(20), out, e_pos, e_neg,
    )  # fmt: skip
    expected = np.exp(-np.maximum(z.astype(np.float64), 0))
    normal = z <= 87  # beyond, the kernel returns about 1.6e-38 (true values < 1.7e-38)
    rel = np.abs(e_pos - expected)[normal] / expected[normal]
    assert rel.max() < 1.5e-7  # about 1 ulp of float32
    assert e_pos[~normal].max() < 1.7e-38
    assert e_pos[-4] == 1.0  # exp(-0) = 1 exactly
    assert 0 <= e_pos[-1] < 2e-38 and np.array_equal(out, e_neg - e_pos)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_sc_activation_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:  # noqa: E501
    torch.manual_seed(0)
    z_pos = (torch.rand(4, 3, 5, 7) * 3).requires_grad_()
    z_neg = (torch.rand(4, 3, 5, 7) * 3).requires_grad_()
    scale = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    b = torch.randn(1, 3, 1, 1, requires_grad=True) if bias else None
    layout = ChannelLayout(3, 35)
    grad = torch.randn(4, 3, 5, 7)

    def run() -> list[torch.Tensor]:
        for t in (z_pos, z_neg, b):
            if t is not None:
                t.grad = None
        out = sc_activation(z_pos, z_neg, scale, b, layout=layout)
        out.backward(grad)
        grads = [z_pos.grad, z_neg.grad] + ([b.grad] if b is not None else [])
        return [out.detach(), *grads]

    fused = run()
    monkeypatch.setattr(noise, "cpu_pointwise", None)
    monkeypatch.setattr("approxctl.proxy_ops.use_kernels", lambda *t: False)
    reference = run()
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("pairs", [1, 2])
def test_fused_hardtanh_pairs_equal_the_torch_path(monkeypatch: pytest.MonkeyPatch, pairs: int) -> None:  # noqa: E501
    torch.manual_seed(1)
    zs = [(torch.rand(3, 4, 6, 6) * 5 - 1).requires_grad_() for _ in range(2 * pairs)]
    zs[0].data[0, 0, 0, :3] = torch.tensor([0.0, 2.5, -0.0])  # the clamp's edges are inside
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1)
    bias = torch.randn(1, 4, 1, 1, requires_grad=True)
    grad = torch.randn(3, 4, 6, 6)

    def run() -> list[torch.Tensor]:
        for t in (*zs, bias):
            t.grad = None
        out = hardtanh_pairs(
            [(zs[2 * i], zs[2 * i + 1]) for i in range(pairs)], 2.5, scale, bias,
            layout=ChannelLayout(4, 36),
        )  # fmt: skip
        out.backward(grad)
        return [out.detach(), bias.grad, *(z.grad for z in zs)]

    fused = run()
    monkeypatch.setattr("approxctl.proxy_ops.use_kernels", lambda *t: False)
    reference = run()
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


def test_fused_kernels_serve_linear_layouts() -> None:
    z_pos, z_neg = torch.rand(5, 7), torch.rand(5, 7)
    scale, bias = torch.rand(7) + 0.5, torch.randn(7)
    out = sc_activation(z_pos, z_neg, scale, bias, layout=ChannelLayout(7, 1))
    expected = ((1 - torch.exp(-z_pos)) - (1 - torch.exp(-z_neg))) * scale + bias
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert cpu_pointwise is not None


def test_fake_quant_kernel_equals_torch_bit_for_bit() -> None:
    from approxctl.proxy_ops import fake_quant

    step = 0.037
    x = torch.cat([
        torch.randn(100_000) * 5,
        torch.arange(-300, 301) * step,  # exact multiples
        (torch.arange(-300, 300) + 0.5) * step,  # ties (up to float rounding of x / step)
        torch.tensor([0.0, -0.0, 1e-30, -1e30, 1e30, float("inf"), -float("inf")]),
    ]).requires_grad_()  # fmt: skip
    for qmin, qmax in ((0, 32), (-127, 127), (0, 255)):
        got = fake_quant(x, step, qmin, qmax)
        (grad_got,) = torch.autograd.grad(got, x, torch.arange(x.numel()).float())
        expected = torch.fake_quantize_per_tensor_affine(x, step, 0, qmin, qmax)
        (grad_expected,) = torch.autograd.grad(expected, x, torch.arange(x.numel()).float())
        assert torch.equal(got, expected)
        assert torch.equal(grad_got, grad_expected)


def test_nan_inputs_stay_nan_in_the_fused_kernels() -> None:
    """A diverged layer input must show up downstream (the trainer stops on a NaN loss), so the
    kernels propagate NaN; torch's CPU fake_quantize maps it to qmin * step instead."""
    from approxctl.proxy_ops import fake_quant

    z = torch.tensor([float("nan"), 0.5])
    zero, one, layout = torch.zeros(2), torch.ones(()), ChannelLayout(1, 1)
    spec = NoiseSpec(torch.tensor([0.1]), torch.tensor([0.2]), -1.0, 1.0)
    outputs = [
        fake_quant(z, 0.1, 0, 32),
        sc_activation(z, zero, one, None, layout=layout, noise=spec),
        hardtanh_pairs([(z, zero)], 2.0, one, None, layout=layout, noise=spec),
        add_error(z, spec, scale=one, bias=torch.zeros(()), layout=layout),
    ]
    for out in outputs:
        assert torch.isnan(out[0]) and torch.isfinite(out[1])


# Segment lengths that take every block shape of the kernels: short segments in flat loops
# (1, 3), runs of whole segments (35), one segment per block (1500), segments cut in pieces
# (5000) and a last piece shorter than the flat-loop threshold (2050 = 2048 + 2), the last three
# with the error computed inside the output loops (segments of FUSED_FROM and more); channel counts
# that do not divide the segments per block, so channels wrap inside and across blocks.
BLOCK_SHAPES = [(1, 7, 900), (3, 5, 400), (35, 3, 70), (1500, 3, 3), (5000, 2, 2), (2050, 3, 2)]


@pytest.mark.parametrize(("inner", "channels", "samples"), BLOCK_SHAPES)
def test_every_block_shape_applies_each_channels_scale_and_bias(
    inner: int, channels: int, samples: int
) -> None:
    """sigma = 0, mu(t) = 0.5 + 0.5 t with t = v / 50: add_error adds mu * scale[c] =
    0.5 * scale[c] + 0.01 * (y - bias[c]) to every element of channel c (so both its passes
    must pick the element's channel), and the fused activation applies its channel's affine
    map, whatever the cut."""
    torch.manual_seed(0)
    shape = (samples, channels, inner)
    layout = ChannelLayout(channels, inner)
    scale = (torch.rand(channels) + 0.5).view(1, -1, 1)
    bias = torch.randn(channels).view(1, -1, 1)
    y = torch.randn(shape)
    spec = NoiseSpec(torch.tensor([0.5, 0.5]), torch.tensor([0.0]), -50.0, 50.0)
    out = add_error(y, spec, scale=scale, bias=bias, layout=layout)
    torch.testing.assert_close(out - y, 0.5 * scale + 0.01 * (y - bias), rtol=1e-5, atol=1e-6)
    z_pos, z_neg = torch.rand(shape) * 2, torch.rand(shape) * 2
    fused = sc_activation(z_pos, z_neg, scale, bias, layout=layout)
    expected = ((1 - torch.exp(-z_pos)) - (1 - torch.exp(-z_neg))) * scale + bias
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    a, b = torch.rand(shape) * 3 - 1, torch.rand(shape) * 3 - 1
    pair = hardtanh_pairs([(a, b)], 1.5, scale, bias, layout=layout)
    torch.testing.assert_close(pair, (a.clamp(0, 1.5) - b.clamp(0, 1.5)) * scale + bias)


@pytest.mark.parametrize(("inner", "channels", "samples"), [(40, 3, 2), *BLOCK_SHAPES])
def test_every_block_shape_draws_the_same_error_in_fused_and_separate_kernels(
    inner: int, channels: int, samples: int
) -> None:
    """With scale 1 and bias 0 the fused draw is bit for bit the proxy plus add_error's draw."""
    shape = (samples, channels, inner)
    layout, one = ChannelLayout(channels, inner), torch.ones(())
    z_pos, z_neg = torch.rand(shape) * 2, torch.rand(shape) * 2
    spec = NoiseSpec(torch.tensor([0.1, -0.2, 0.05]), torch.tensor([0.2, 0.1]), -0.8, 0.9)
    torch.manual_seed(5)
    fused = sc_activation(z_pos, z_neg, one, None, layout=layout, noise=spec)
    plain = sc_activation(z_pos, z_neg, one, None, layout=layout)
    torch.manual_seed(5)
    separate = add_error(plain, spec, scale=one, bias=torch.zeros(()), layout=layout)
    assert torch.equal(fused, separate)
    assert not torch.equal(fused, plain)
    assert float((fused - plain).std()) > 0.1  # a real draw: sigma(t) is 0.1 to 0.3


@pytest.mark.parametrize(("inner", "channels", "samples"), BLOCK_SHAPES)
def test_every_block_shape_gives_the_torch_paths_gradients(
    monkeypatch: pytest.MonkeyPatch, inner: int, channels: int, samples: int
) -> None:
    """The backward kernels cut blocks like the forward ones: each element's gradient must use
    its own channel's scale, and each channel's bias gradient must collect its own segments."""
    torch.manual_seed(3)
    shape = (samples, channels, inner)
    layout = ChannelLayout(channels, inner)
    scale = (torch.rand(channels) + 0.5).view(1, -1, 1)
    grad = torch.randn(shape)
    z_sc = [(torch.rand(shape) * 2).requires_grad_() for _ in range(2)]
    z_ht = [(torch.rand(shape) * 3 - 1).requires_grad_() for _ in range(4)]
    bias = torch.randn(1, channels, 1, requires_grad=True)

    def run() -> list[torch.Tensor]:
        grads = []
        pair, pairs = [tuple(z_ht[:2])], [tuple(z_ht[:2]), tuple(z_ht[2:])]
        for z, act in (
            (z_sc, lambda: sc_activation(*z_sc, scale, bias, layout=layout)),
            (z_ht[:2], lambda: hardtanh_pairs(pair, 1.5, scale, bias, layout=layout)),
            (z_ht, lambda: hardtanh_pairs(pairs, 1.5, scale, bias, layout=layout)),
        ):
            for t in (*z, bias):
                t.grad = None
            act().backward(grad)
            grads += [bias.grad.clone(), *(t.grad.clone() for t in z)]
        return grads

    fused = run()
    monkeypatch.setattr("approxctl.proxy_ops.use_kernels", lambda *t: False)
    reference = run()
    for got, expected in zip(fused, reference, strict=True):
        # atol: a bias gradient sums up to 10^4 float32 terms, in another order than torch's
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
