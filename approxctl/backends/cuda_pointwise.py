"""The pointwise kernels of ``kernels/pointwise.cu`` on CUDA float32 tensors: inject mode's
proxies (forward with the injected error and the output's affine map, and backward) and the
error draw alone, one launch each (``approxctl.proxy_ops`` and ``approxctl.noise`` call these
where the tensors are on a GPU; the torch ops they replace stay the path elsewhere).

Used where CuPy is installed, unless ``APPROXCTL_BACKEND=torch`` forces the reference or
``APPROXCTL_CUDA_POINTWISE=0`` turns these kernels alone off (the matmul kernels stay). The
launch plans (``cuda_kernels.plan_*``) are the ones tests/test_kernels_emulated.py runs through
the C++ emulation of the kernels against the formulas.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from approxctl.backends import cuda_kernels, registry
from approxctl.noise import ChannelLayout, NoiseSpec, channel_values

ENV_VAR = "APPROXCTL_CUDA_POINTWISE"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels serve these tensors: all CUDA float32 and not empty, CuPy usable, the
    reference not forced, the kernels not turned off."""
    return (
        all(t.is_cuda and t.dtype == torch.float32 and t.numel() > 0 for t in tensors)
        and os.environ.get(ENV_VAR, "").strip() != "0"
        and registry.forced() != "torch"
        and registry.available("cupy")
    )


def _run(launch: cuda_kernels.Launch, like: torch.Tensor) -> None:
    from approxctl.backends import cupy_backend

    cupy_backend.run(launch, cupy_backend.tensor_device_index(like))


def _vectors(
    scale: torch.Tensor | float, bias: torch.Tensor | float | None, layout: ChannelLayout,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return (
        channel_values(scale, layout.channels, device),
        channel_values(0.0 if bias is None else bias, layout.channels, device),
    )


def add_error(
    y: torch.Tensor, out: torch.Tensor, spec: NoiseSpec, scale: Any, bias: Any,
    layout: ChannelLayout,
) -> None:  # fmt: skip
    """out = y + error(v) * scale, v = (y - bias) / scale (``out`` may be ``y``; both
    contiguous)."""
    s, b = _vectors(scale, bias, layout, y.device)
    noise = cuda_kernels.noise_args(spec, y.device)
    _run(cuda_kernels.plan_add_error(y, out, s, b, layout.channels, layout.inner, noise), y)


def sc_forward(
    z_pos: torch.Tensor, z_neg: torch.Tensor, scale: Any, bias: Any, layout: ChannelLayout,
    noise: NoiseSpec | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """SC_act's output, e^-z+, e^-z- and the scale vector its backward takes."""
    s, b = _vectors(scale, bias, layout, z_pos.device)
    launch, out, e_pos, e_neg = cuda_kernels.plan_sc_proxy_forward(
        z_pos, z_neg, s, b, layout.channels, layout.inner,
        cuda_kernels.noise_args(noise, z_pos.device),
    )  # fmt: skip
    _run(launch, z_pos)
    return out, e_pos, e_neg, s


def sc_backward(
    grad: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, scale: torch.Tensor,
    layout: ChannelLayout,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    launch, grad_pos, grad_neg = cuda_kernels.plan_sc_proxy_backward(
        grad, e_pos, e_neg, scale, layout.channels, layout.inner
    )
    _run(launch, grad)
    return grad_pos, grad_neg


def hardtanh_forward(
    zs: tuple[torch.Tensor, ...], limit: float, scale: Any, bias: Any, layout: ChannelLayout,
    noise: NoiseSpec | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Analog_act's output, its masks and the scale vector its backward takes."""
    s, b = _vectors(scale, bias, layout, zs[0].device)
    launch, out, inside = cuda_kernels.plan_hardtanh_proxy_forward(
        zs, limit, s, b, layout.channels, layout.inner,
        cuda_kernels.noise_args(noise, zs[0].device),
    )  # fmt: skip
    _run(launch, zs[0])
    return out, inside, s


def hardtanh_backward(
    grad: torch.Tensor, inside: torch.Tensor, scale: torch.Tensor, layout: ChannelLayout,
    terms: int,
) -> list[torch.Tensor]:  # fmt: skip
    launch, grads = cuda_kernels.plan_hardtanh_proxy_backward(
        grad, inside, scale, layout.channels, layout.inner, terms
    )
    _run(launch, grad)
    return grads
