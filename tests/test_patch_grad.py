"""approxctl.patch_grad: a first layer's weight gradient from the input's patches, checked
against torch's convolution gradient in float64; the forward is torch's convolution itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import approxctl
from approxctl import patch_grad
from approxctl.integer_conv import ConvGeometry
from approxctl.layers import ApproxConv2d

# (batch, in, out, size, kernel, stride, padding, dilation): fewer than 64 products per output
GEOMETRIES = [
    (3, 1, 8, 12, 5, 1, 2, 1),
    (2, 3, 5, 11, 3, 2, 1, 1),
    (2, 2, 4, 13, 3, 1, 3, 2),
    (1, 1, 6, 9, 7, 3, 0, 1),
]


def _geometry(stride: int, padding: int, dilation: int) -> ConvGeometry:
    return ConvGeometry((stride, stride), (padding, padding), (dilation, dilation), 1)


@pytest.mark.parametrize("case", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_is_torch_and_gradients_match_float64(case, with_bias: bool) -> None:
    n, c, o, size, k, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(n, c, size, size, generator=gen)
    w = torch.randn(o, c, k, k, generator=gen).requires_grad_()
    b = torch.randn(o, generator=gen).requires_grad_() if with_bias else None
    geometry = _geometry(stride, padding, dilation)
    assert patch_grad.serves(x, w, geometry)
    y = patch_grad.conv2d(x, w, b, geometry)
    assert y.grad_fn is not None and "PatchGradConv" in type(y.grad_fn).__name__
    assert torch.equal(y, F.conv2d(x, w, b, *geometry.args))  # the same op, bit for bit
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    F.conv2d(x.double(), w64, b64, *geometry.args).backward(g.double())
    assert w.grad is not None and w64.grad is not None
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
    if b is not None:
        assert b.grad is not None and b64 is not None
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-4)


def test_torch_convolution_where_patches_do_not_serve() -> None:
    gen = torch.Generator().manual_seed(0)
    plain = _geometry(1, 1, 1)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    w = torch.randn(4, 1, 3, 3, generator=gen).requires_grad_()
    cases = {
        "input wants a gradient": (x.clone().requires_grad_(), w, plain),
        "64 products per output": (torch.randn(2, 16, 8, 8), torch.randn(4, 16, 2, 2), plain),
        "groups": (
            torch.randn(2, 2, 8, 8),
            w.detach().repeat(2, 1, 1, 1).requires_grad_(),
            ConvGeometry((1, 1), (1, 1), (1, 1), 2),
        ),
        "float64": (x.double(), w.detach().double().requires_grad_(), plain),
    }
    for name, (xi, wi, geometry) in cases.items():
        assert not patch_grad.serves(xi, wi, geometry), name
        y = patch_grad.conv2d(xi, wi, None, geometry)
        assert "PatchGradConv" not in type(y.grad_fn).__name__, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not patch_grad.serves(x, w, plain)
    with torch.no_grad():  # no graph to record
        assert patch_grad.conv2d(x, w, None, plain).grad_fn is None


def test_first_layer_of_approx_mult_trains_like_torch_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """approx-mult's first layer (K = 25) in inject mode takes its weight gradient from
    patches; with the error's spread off it equals torch's gradient of the same proxy up to
    rounding."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 6, 5, padding=2)
    model = torch.nn.Sequential(
        conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 64, 3)
    )
    x = torch.randn(4, 1, 8, 8)
    model = approxctl.convert(model, "am", noise_scale=0.0)
    approxctl.calibrate(model, [x])
    approxctl.fit_error_model(model, [x])
    approxctl.set_mode(model, "inject")
    layer = model.get_submodule("0")
    assert isinstance(layer, ApproxConv2d)
    calls = []
    real = patch_grad._PatchGradConv.backward

    def counted(ctx, grad):  # type: ignore[no-untyped-def]
        calls.append(grad.shape)
        return real(ctx, grad)

    with monkeypatch.context() as patched:
        patched.setattr(patch_grad._PatchGradConv, "backward", staticmethod(counted))
        model(x).square().sum().backward()
    assert len(calls) == 1  # the first layer only
    got = layer.weight.grad.clone()  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    # The same step with the patch path off: torch's convolution gradient.
    monkeypatch.setattr(patch_grad, "serves", lambda *args: False)
    model(x).square().sum().backward()
    torch.testing.assert_close(got, layer.weight.grad, rtol=1e-4, atol=1e-4)
