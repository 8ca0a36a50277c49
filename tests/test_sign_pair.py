"""approxctl.sign_pair: the positive- and negative-weight accumulations of one input, whose
backward runs one dense pass plus a sparse correction where their gradients are (mostly) each
other's negation, checked against two plain accumulations under autograd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import approxctl
from approxctl import integer_conv, sign_pair
from approxctl.integer_conv import ConvGeometry
from approxctl.layers import ApproxConv2d, ApproxLinear
from approxctl.noise import ChannelLayout
from approxctl.proxy_ops import hardtanh_pairs

# (batch, in, out, size, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (3, 4, 6, 9, 3, 1, 1, 1, 1),
    (2, 6, 6, 11, 3, 2, 2, 2, 3),
    (2, 3, 8, 8, 5, 1, 2, 1, 1),
    (2, 4, 4, 7, 3, 1, 0, 1, 4),  # depthwise, no padding
]
# How g- departs from -g+: nowhere, in a few places (the sparse correction), almost
# everywhere (past SPARSE_FRACTION: the two dense passes).
PATTERNS = {"negation": 0.0, "sparse": 0.005, "dense": 0.5}
SPARSE_FRACTION = 0.05  # these outputs are small: allow a correction of up to 1 in 20


def _operands(shape_x: tuple[int, ...], shape_w: tuple[int, ...], need_x: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape_x, generator=gen).requires_grad_(need_x)
    w = torch.randn(shape_w, generator=gen).requires_grad_()
    return x, w


def _output_grads(shape: torch.Size, fraction: float, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    g_pos = torch.randn(shape, generator=gen)
    g_neg = -g_pos
    if fraction:
        hit = torch.rand(shape, generator=gen) < fraction
        hit.view(-1)[0] = True  # at least one departure, at the first and the last position
        hit.view(-1)[-1] = True
        # saturated outputs: one side's gradient is zero, sometimes both
        g_neg = torch.where(hit, torch.zeros(()), g_neg)
        both = hit & (torch.rand(shape, generator=gen) < 0.3)
        both.view(-1)[0] = False  # so d = g+ + g- has a nonzero whatever the draw
        both.view(-1)[-1] = True
        g_pos = torch.where(both, torch.zeros(()), g_pos)
    return g_pos, g_neg


def _check(
    accumulate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pair: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    w: torch.Tensor,
    fraction: float,
    seed: int,
) -> None:
    # the way analog splits its weights, so the weight gradient goes through both clamps
    def split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return w.clamp(min=0), (-w).clamp(min=0)

    w_pos, w_neg = split(w)
    want = (accumulate(x, w_pos), accumulate(x, w_neg))
    g_pos, g_neg = _output_grads(want[0].shape, fraction, seed)
    want_grads = torch.autograd.grad(want, [x, w] if x.requires_grad else [w], (g_pos, g_neg))

    w_pos, w_neg = split(w)
    got = pair(x, w_pos, w_neg)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got_grads = torch.autograd.grad(got, [x, w] if x.requires_grad else [w], (g_pos, g_neg))
    for g, r in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def _count_dense(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records each dense backward pass: True where it took the patches' batched GEMM."""
    monkeypatch.setattr(sign_pair, "SPARSE_FRACTION", SPARSE_FRACTION)
    calls: list[bool] = []
    real = sign_pair._DenseBackward.__call__

    def counted(self, grad, weight, need_w):  # type: ignore[no-untyped-def]
        calls.append(need_w and self.by_patches(weight))
        return real(self, grad, weight, need_w)

    monkeypatch.setattr(sign_pair._DenseBackward, "__call__", counted)
    return calls


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_pair_has_the_two_convs_gradients(
    geometry: tuple[int, ...], need_x: bool, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, c, o, size, k, stride, pad, dil, groups = geometry
    conv = ConvGeometry((stride, stride), (pad, pad), (dil, dil), groups)
    x, w = _operands((n, c, size, size), (o, c // groups, k, k), need_x, sum(geometry))
    dense = _count_dense(monkeypatch)
    _check(
        lambda x, w: F.conv2d(x, w, None, *conv.args),
        lambda x, p, m: sign_pair.sign_pair(x, p, m, conv),
        x, w, PATTERNS[pattern], sum(geometry),
    )  # fmt: skip
    assert len(dense) == (2 if pattern == "dense" else 1)
    # a first layer's weight gradient (K < 64, no input gradient) by the patches' GEMM
    small = c // groups * k * k < integer_conv.MIN_REDUCTION
    assert all(dense) == (not need_x and groups == 1 and small)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("leading", [(64,), (4, 40)])
def test_linear_pair_has_the_two_linears_gradients(
    leading: tuple[int, ...], need_x: bool, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, w = _operands((*leading, 24), (10, 24), need_x, len(leading))
    dense = _count_dense(monkeypatch)
    _check(
        F.linear, lambda x, p, m: sign_pair.sign_pair(x, p, m, None), x, w, PATTERNS[pattern],
        len(leading),
    )  # fmt: skip
    assert len(dense) == (2 if pattern == "dense" else 1)


def test_nan_gradients_take_the_dense_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN output gradient is a departure from negation like any other, so it reaches the
    weight gradient as it would through two plain convolutions."""
    conv = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    x, w = _operands((2, 3, 6, 6), (4, 3, 3, 3), True, 0)
    w_pos, w_neg = w.clamp(min=0), (-w).clamp(min=0)
    z_pos, z_neg = sign_pair.sign_pair(x, w_pos, w_neg, conv)
    g = torch.randn(z_pos.shape)
    g[0, 0, 0, 0] = float("nan")
    grad_w = torch.autograd.grad((z_pos, z_neg), [w], (g, -g))[0]
    assert bool(torch.isnan(grad_w).any())


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_analog_layers_take_the_pair_and_keep_their_gradients(padding_mode: str) -> None:
    """Analog's proxy through ``accumulate_pair`` (conv with integer sums in inject mode, conv
    with float sums in exact mode, linear) has the gradients of its two plain accumulations."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3, padding=1, padding_mode=padding_mode),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),  # K = 72: integer sums in inject mode
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 36, 5),
    )
    model = approxctl.convert(model, "analog")
    batches = [torch.randn(8, 2, 6, 6) for _ in range(2)]
    approxctl.calibrate(model, batches)
    approxctl.fit_error_model(model, batches)
    layers = [m for m in model.modules() if isinstance(m, ApproxConv2d | ApproxLinear)]
    x = batches[0]
    for mode in ("exact", "inject"):
        approxctl.set_mode(model, mode)
        grads = []
        for plain in (False, True):
            if plain:  # the two accumulations as separate autograd nodes
                for layer in layers:
                    layer.accumulate_pair = (  # type: ignore[method-assign]
                        lambda x, p, m, codes=None, negation=None, layer=layer: (
                            layer.accumulate(x, p),
                            layer.accumulate(x, m),
                        )
                    )
            torch.manual_seed(1)  # the same injected error both times
            model.zero_grad()
            model(x).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for layer in layers:
            del layer.accumulate_pair
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["sc", "analog"])
def test_pair_under_cpu_autocast(target: str) -> None:
    """``train --amp`` on CPU: autocast runs the pair's float convolutions in bfloat16, so its
    backward receives bfloat16 gradients; it computes in the operands' float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 5),
    )  # fmt: skip
    model = approxctl.convert(model, target)
    batches = [torch.randn(8, 1, 8, 8)]
    approxctl.calibrate(model, batches)
    approxctl.fit_error_model(model, batches)
    for mode in ("inject", "exact"):
        approxctl.set_mode(model, mode)
        model.zero_grad()
        with torch.autocast("cpu"):
            loss = model(batches[0]).float().square().sum()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32
            assert bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize(
    "clamped", [None, "pos", "neg", "both", "second pair", "no gradient there", "linear"]
)
def test_hardtanh_pairs_tell_the_pair_when_its_gradients_are_negations(
    clamped: str | None,
) -> None:
    """The HardTanh pair's CPU backward marks a pair's ``Negation`` certain exactly where the
    gradients it sends to z_pos and z_neg add up to zero everywhere: no output clamped on one
    side only where its gradient is nonzero (what the pair's scan would find)."""
    gen = torch.Generator().manual_seed(3)
    t = 10.0
    shape = (6, 5) if clamped == "linear" else (2, 3, 4, 4)
    zs = [(torch.rand(shape, generator=gen) * t).requires_grad_() for _ in range(4)]
    at = (1, 2) if clamped == "linear" else (1, 2, 3, 0)
    with torch.no_grad():
        if clamped in ("pos", "both", "no gradient there", "linear"):
            zs[0][at] = t + 1
        if clamped in ("neg", "both"):
            zs[1][at] = t + 2  # with "both", the same output: both clamped, negations
        if clamped == "second pair":
            zs[3][(0,) * len(shape)] = t * 2
    grad = torch.randn(shape, generator=gen)
    if clamped == "no gradient there":
        grad[at] = 0.0  # as max pooling leaves most of a layer's output gradient
    negations = [sign_pair.Negation(), sign_pair.Negation()]
    layout = ChannelLayout(5, 1) if clamped == "linear" else ChannelLayout(3, 16)
    scale = torch.ones(5) if clamped == "linear" else torch.ones(3, 1, 1)
    pairs = [(zs[0], zs[1]), (zs[2], zs[3])]
    out = hardtanh_pairs(pairs, t, scale, None, layout=layout, negations=negations)
    assert not any(n.certain for n in negations)  # only the backward knows
    out.backward(grad)
    pos_clean = clamped in (None, "both", "second pair", "no gradient there")
    assert negations[0].certain == pos_clean
    assert negations[1].certain == (clamped != "second pair")
    for (a, b), negation in zip(((zs[0], zs[1]), (zs[2], zs[3])), negations, strict=True):
        assert negation.certain == (not bool((a.grad + b.grad).any()))


def test_analog_gradients_are_the_same_when_the_scan_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
    small_analog_model: Callable[[], tuple[torch.nn.Module, torch.Tensor]],
) -> None:
    """Where the HardTanh pair vouches for negations, the sign pair's backward skips its scan
    of g+ + g-; the gradients are those of the scan, bit for bit (and the scan ran only when
    not vouched for)."""
    scans = []
    real = sign_pair.cpu_sparse_grad.nonzero_sums

    def counting(*args: object) -> int:
        scans.append(1)
        return real(*args)

    monkeypatch.setattr(sign_pair.cpu_sparse_grad, "nonzero_sums", counting)
    results = []
    for vouch in (True, False):
        if not vouch:
            monkeypatch.setattr(
                sign_pair.Negation, "certain", property(lambda self: False, lambda self, v: None)
            )
        model, x = small_analog_model()
        scans.clear()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        results.append(([p.grad.clone() for p in model.parameters()], len(scans)))
    (vouched, vouched_scans), (scanned, all_scans) = results
    assert all_scans == 2 and vouched_scans < all_scans
    for got, want in zip(vouched, scanned, strict=True):
        assert torch.equal(got, want)
