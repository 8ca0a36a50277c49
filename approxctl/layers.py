"""Approximate conv2d / linear layers with the three modes of SPEC section 4.

``ApproxConv2d`` and ``ApproxLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``: ``float`` mode is
the parent's forward untouched (so it equals plain PyTorch bit for bit), the parameters keep their
names, and code that inspects ``in_channels`` or ``weight`` keeps working.

In ``exact`` and ``inject`` modes the target quantizes input and weight, computes the proxy
activation (paper section 3.1) of the accumulation, and then

* ``exact``:  ``acc = proxy + (exact - proxy).detach()`` — the hardware's result forward, the
  proxy's gradient backward (straight-through);
* ``inject``: ``acc = proxy + error.detach()`` with the error drawn from the layer's error model;

and the output is ``acc * output_scale + bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from approxctl.error_models import ErrorModel, make_error_model
from approxctl.errors import ApproxError
from approxctl.targets.base import Target, TargetConfig

MODES = ("float", "exact", "inject")


class ApproxLayer(nn.Module):
    """Mode handling and calibration state shared by the conv and linear layers.

    Subclasses provide the geometry: ``accumulate`` (a float conv/linear without bias),
    ``patches`` / ``weight_matrix`` / ``fold`` (the im2col view used by the integer ops).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    channel_dim: int

    def _setup_approx(self, target: Target, config: TargetConfig, name: str) -> None:
        self.target = target
        self.config = config
        self.layer_name = name
        self.mode = "float"
        # Calibration state (SPEC section 2): activation range and whether inputs go negative.
        device = self.weight.device
        self.register_buffer("act_absmax", torch.tensor(0.0, device=device))
        self.register_buffer("input_signed", torch.tensor(False, device=device))
        self.register_buffer("calibrated", torch.tensor(False, device=device))
        self.error_model: ErrorModel = make_error_model(
            target.error_kind, config.poly_degree, config.poly_bins
        ).to(device)
        self.observing = False
        self.recording = False
        self.checkpointing = False
        target.init_layer(self)

    # ----------------------------------------------------------------- modes
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ApproxError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
        self.mode = mode

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target.name}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            if self.observing:
                self.observe(x)
            return self.float_forward(x)
        self._check_ready()
        if self.mode == "inject" and not bool(self.error_model.fitted):
            raise ApproxError(
                f"layer '{self.layer_name}' has no fitted error model; run "
                "approxctl.fit_error_model(model, batches) before inject mode"
            )
        if self.checkpointing and torch.is_grad_enabled() and not self.recording:
            # Paper section 3.4: keep only the layer input for backward and recompute the
            # quantization, proxy and injected error (same RNG state) when gradients are needed.
            # The exact emulation is computed once, outside, since it carries no gradient.
            exact = None
            if self.mode == "exact":
                with torch.no_grad():
                    exact = self.target.exact(self, self.target.quantize(self, x))
            return checkpoint(self._approx_forward, x, exact, use_reentrant=False)
        return self._approx_forward(x, None)

    def _approx_forward(self, x: torch.Tensor, exact: torch.Tensor | None) -> torch.Tensor:
        q = self.target.quantize(self, x)
        proxy = self.target.proxy(self, q)
        if self.mode == "exact":
            if exact is None:
                with torch.no_grad():
                    exact = self.target.exact(self, q)
            if self.recording:  # fit_error_model: error of the proxy against the hardware
                self.error_model.record(proxy.detach(), exact - proxy.detach())
            acc = proxy + (exact - proxy).detach()
        else:  # inject
            acc = proxy + self.error_model.sample(proxy.detach())
        y = acc * self.per_channel(self.target.output_scale(self, q))
        if self.bias is not None:
            y = y + self.per_channel(self.bias)
        return y

    def _check_ready(self) -> None:
        if not bool(self.calibrated):
            raise ApproxError(
                f"layer '{self.layer_name}' is not calibrated; run approxctl.calibrate(model, "
                "batches) (or convert with example_inputs) before exact or inject mode"
            )

    # ------------------------------------------------------------ calibration
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Calibration pass 1: running max of |x| and whether x goes negative."""
        if x.numel() == 0:
            return
        self.act_absmax.copy_(torch.maximum(self.act_absmax, x.detach().abs().max().float()))
        self.input_signed.logical_or_(x.detach().min() < 0)

    def finish_observation(self) -> None:
        self.calibrated.fill_(True)

    def act_scale(self) -> torch.Tensor:
        """The calibrated activation range s_x (1 when the layer never saw a non-zero input)."""
        return torch.where(self.act_absmax > 0, self.act_absmax, torch.ones_like(self.act_absmax))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.layer_name,
            "kind": type(self).__name__,
            "target": self.target.name,
            "act_absmax": float(self.act_absmax),
            "input_signed": bool(self.input_signed),
            **self.target.describe(self),
        }

    # --------------------------------------------------------------- geometry
    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accumulate_pair(
        self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input as GEMM rows per group, (G, R, K_g), K ordered (in_channel, kh, kw)."""
        raise NotImplementedError

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Weight as GEMM rows per group, (G, O_g, K_g)."""
        raise NotImplementedError

    def fold(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(G, R, O_g) GEMM output -> the layer's output layout for input ``like``."""
        raise NotImplementedError

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def reduction_size(self) -> int:
        """K per group: the length of one dot product."""
        raise NotImplementedError

    def integer_gemm(
        self,
        op: Callable[..., torch.Tensor],
        rows: torch.Tensor,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        """``op(a_g, *w_g) -> (R, O_g)`` per group of (G, R, K) rows and (G, O_g, K) weights."""
        out = [op(rows[g], *(w[g] for w in weights)) for g in range(rows.shape[0])]
        return torch.stack(out)


class ApproxConv2d(ApproxLayer, nn.Conv2d):
    """``nn.Conv2d`` computed on approximate hardware (any stride, padding, dilation, groups)."""

    channel_dim = 1

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, target: Target, config: TargetConfig, name: str
    ) -> ApproxConv2d:
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._setup_approx(target, config, name)
        return layer

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d.forward(self, x)

    def _explicit_pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Input padded the way nn.Conv2d pads it, and the padding left for the conv itself."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str):  # 'same' may pad asymmetrically; 'valid' pads nothing
            return F.pad(x, self._reversed_padding_repeated_twice), (0, 0)
        return x, (int(self.padding[0]), int(self.padding[1]))

    def accumulate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, pad = self._explicit_pad(x)
        return F.conv2d(x, w, None, self.stride, pad, self.dilation, self.groups)

    def conv_geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Input with non-zero/asymmetric padding applied, and the remaining conv arguments."""
        x, pad = self._explicit_pad(x)
        return x, {
            "stride": tuple(self.stride),
            "padding": pad,
            "dilation": tuple(self.dilation),
            "groups": self.groups,
        }

    def accumulate_pair(
        self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One conv with both weight sets, interleaved per group so each stays in its group.
        g = self.groups
        o = w1.shape[0]
        both = torch.stack(
            [w1.view(g, o // g, *w1.shape[1:]), w2.view(g, o // g, *w2.shape[1:])], 1
        )
        y = self.accumulate(x, both.reshape(2 * o, *w1.shape[1:]))
        y = y.view(y.shape[0], g, 2, o // g, *y.shape[2:])
        return y[:, :, 0].reshape(y.shape[0], o, *y.shape[4:]), y[:, :, 1].reshape(
            y.shape[0], o, *y.shape[4:]
        )

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        x, pad = self._explicit_pad(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, pad, self.stride)  # (N, C*kh*kw, P)
        n, _, p = cols.shape
        g = self.groups
        cols = cols.view(n, g, -1, p).permute(1, 0, 3, 2)  # (G, N, P, K_g)
        return cols.reshape(g, n * p, -1)

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        g = self.groups
        return w.reshape(g, w.shape[0] // g, -1)

    def fold(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        g, _, og = y.shape
        n = like.shape[0]
        h, w = self.output_hw(like)
        return y.view(g, n, h * w, og).permute(1, 0, 3, 2).reshape(n, g * og, h, w)

    def output_hw(self, x: torch.Tensor) -> tuple[int, int]:
        size = [x.shape[-2], x.shape[-1]]
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            left_w, right_w, top, bottom = self._reversed_padding_repeated_twice
            size = [size[0] + top + bottom, size[1] + left_w + right_w]
            pad = (0, 0)
        else:
            pad = (int(self.padding[0]), int(self.padding[1]))
        h, w = (
            (size[i] + 2 * pad[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i]
            + 1
            for i in range(2)
        )
        return h, w

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1) if t.dim() == 1 else t

    @property
    def reduction_size(self) -> int:
        return (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]


class ApproxLinear(ApproxLayer, nn.Linear):
    """``nn.Linear`` computed on approximate hardware; inputs of any leading shape."""

    channel_dim = -1

    @classmethod
    def from_float(
        cls, linear: nn.Linear, target: Target, config: TargetConfig, name: str
    ) -> ApproxLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._setup_approx(target, config, name)
        return layer

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x)

    def accumulate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def accumulate_pair(
        self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.linear(x, torch.cat([w1, w2], 0))
        return y[..., : w1.shape[0]], y[..., w1.shape[0] :]

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1, x.shape[-1])

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(0)

    def fold(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y[0].reshape(*like.shape[:-1], y.shape[-1])

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def reduction_size(self) -> int:
        return self.in_features


def approx_layers(model: nn.Module) -> list[tuple[str, ApproxLayer]]:
    """Every approximate layer of ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ApproxLayer)]
