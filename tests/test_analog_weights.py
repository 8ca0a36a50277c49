"""approxctl.analog_weights: analog's weight quantization chain as one node, checked bit for
bit against the torch ops it replaces (forward values and the gradient autograd computes
through them), on generated weights with the edge cases of the chain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from approxctl import analog_weights
from approxctl.layers import approx_layers
from approxctl.targets.base import ste_round


def _torch_chain(w: torch.Tensor, a_step: float) -> tuple[torch.Tensor, ...]:
    """The chain as AnalogTarget wrote it before the fused node (and still runs elsewhere)."""
    scale = w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127
    codes = ste_round(w / scale.view(-1, *([1] * (w.dim() - 1))))
    v = codes / torch.tensor(a_step)
    return scale, codes, v.clamp(min=0), (-v).clamp(min=0)


def _weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.1
    flat = w.view(shape[0], -1)
    flat[0] = 0.0  # an all-zero channel: scale 1e-12 / 127
    if shape[0] > 2:
        flat[1, ::2] = -0.0  # signed zeros, whose codes keep their sign
        flat[1, 1] = 1.0  # the channel's maximum: code 127
        flat[1, 3] = 2.5 / 127  # 2.5 exactly: ties to even, code 2 (-2 below)
        flat[1, 5] = -2.5 / 127
        flat[2, 0] = -7.0  # a negative maximum: code -127
        flat[2, 1] = 1e-40  # subnormal: code 0
    return w


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (4, 1, 3, 3), (10, 64), (3, 7), (1, 1)])
@pytest.mark.parametrize("a_step", [1 / 255, 0.37, 3.0e-5])
def test_split_weights_equal_the_torch_chain_forward_and_backward(
    shape: tuple[int, ...], a_step: float
) -> None:
    w = _weights(shape, sum(shape))
    w_ref = w.clone().requires_grad_()
    w_new = w.clone().requires_grad_()
    scale, codes, pos, neg = _torch_chain(w_ref, a_step)
    split = analog_weights.split_weights(w_new, a_step)
    assert split is not None
    assert torch.equal(split.scale, scale)
    assert split.codes.dtype == torch.int8 and torch.equal(split.codes.float(), codes.detach())
    for got, want in ((split.pos, pos), (split.neg, neg)):
        assert torch.equal(got, want)
        assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.0 where torch keeps it
    assert not split.codes.requires_grad and not split.scale.requires_grad
    gen = torch.Generator().manual_seed(7)
    g_pos, g_neg = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    g_pos.view(-1)[::5] = 0.0  # zeros meet the masks' zeros
    torch.autograd.backward([pos, neg], [g_pos, g_neg])
    torch.autograd.backward([split.pos, split.neg], [g_pos, g_neg])
    assert w_new.grad is not None and w_ref.grad is not None
    assert torch.equal(w_new.grad, w_ref.grad)


def test_split_weights_leave_non_finite_weights_to_the_torch_ops() -> None:
    for bad in (float("nan"), float("inf")):
        w = _weights((4, 2, 3, 3), 1)
        w[3, 1, 2, 0] = bad
        assert analog_weights.split_weights(w.requires_grad_(), 0.01) is None
    assert analog_weights.split_weights(torch.ones(4, 3, dtype=torch.float64), 0.01) is None


def test_analog_inject_steps_are_the_same_with_the_fused_chain(
    monkeypatch: pytest.MonkeyPatch,
    small_analog_model: Callable[[], tuple[torch.nn.Module, torch.Tensor]],
) -> None:
    """A converted model's inject forward and its weight gradients, fused chain against the
    torch ops (the fused node turned off), bit for bit."""
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(analog_weights, "split_weights", lambda w, a_step: None)
        model, x = small_analog_model()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads = [layer.weight.grad.clone() for _, layer in approx_layers(model)]
        results.append((out.detach(), grads))
    (out_fused, grads_fused), (out_torch, grads_torch) = results
    assert torch.equal(out_fused, out_torch)
    for a, b in zip(grads_fused, grads_torch, strict=True):
        assert torch.equal(a, b)
