"""Approximate conv2d / linear layers with the three modes of SPEC section 4.

``ApproxConv2d`` and ``ApproxLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``: ``float`` mode is
the parent's forward untouched (so it equals plain PyTorch bit for bit), the parameters keep their
names, and code that inspects ``in_channels`` or ``weight`` keeps working.

In ``exact`` and ``inject`` modes the target quantizes input and weight and computes the proxy
activation (paper section 3.1) of the accumulation as float outputs ``proxy * scale + bias``
(``scale``: per output channel, from the target's accumulator domain to float). Then

* ``exact``: the forward value is ``exact * scale + bias`` — the hardware's result — and the
  backward is the proxy's gradient (straight-through);
* ``inject``: the error drawn from the layer's error model at the proxy value is added
  (times ``scale``), its gradient passing straight through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from approxctl import integer_conv, patch_grad, sign_pair
from approxctl.error_models import ErrorModel, make_error_model
from approxctl.errors import ApproxError
from approxctl.noise import ChannelLayout
from approxctl.proxy_ops import straight_through
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
            target.error_kind, config.poly_degree, config.poly_bins, config.noise_scale
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
        return self._approx_forward(x)

    def _proxy_output(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantization and proxy: float outputs (bias included) and the output scale."""
        q = self.target.quantize(self, x)
        return self.target.proxy(self, q), self.target.output_scale(self, q)

    def _approx_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "exact" and not torch.is_grad_enabled() and not self.recording:
            return self._exact_value(x)
        if self.mode == "inject":
            # A fused forward saves no output-sized tensor, and under checkpointing only the
            # layer input (the target reads ``self.checkpointing``).
            noise = self.error_model.noise_spec()
            fused = self.target.fused_inject(self, x, noise)
            if fused is not None:
                return fused
        q = None
        if self.checkpointing and torch.is_grad_enabled():
            # Paper section 3.4: keep only the layer input for backward and recompute the
            # quantization and proxy when the gradient is needed. The exact emulation and the
            # injected error carry no gradient and stay outside.
            y, scale = checkpoint(
                self._proxy_output, x, use_reentrant=False, preserve_rng_state=False
            )
        elif self.mode == "inject":
            # The target draws the error in the same pass as its proxy activation.
            q = self.target.quantize(self, x)
            return self.target.proxy(self, q, noise=noise)
        else:
            q = self.target.quantize(self, x)
            y, scale = self.target.proxy(self, q), self.target.output_scale(self, q)
        scale = self.per_channel(scale)
        bias = (
            self.per_channel(self.bias.detach()) if self.bias is not None else scale.new_zeros(())
        )
        if self.mode == "exact":
            with torch.no_grad():
                exact = self.target.exact(
                    self, q if q is not None else self.target.quantize(self, x)
                )
            if self.recording:  # fit_error_model: the proxy's error against the hardware
                v = (y.detach() - bias) / scale
                self.error_model.record(v, exact - v)
            return straight_through(y, exact, scale, bias)
        return self.error_model.inject(y, scale, bias, self.channel_layout(y))

    def _exact_value(self, x: torch.Tensor) -> torch.Tensor:
        """Exact mode without autograd (validation, ``approxctl eval``): the hardware's value
        alone. The proxy only carries the gradient, so it is not computed; the value is the one
        ``straight_through`` forwards, bit for bit."""
        q = self.target.quantize(self, x)
        scale = self.per_channel(self.target.output_scale(self, q))
        exact = self.target.exact(self, q)
        return exact * scale + (self.per_channel(self.bias) if self.bias is not None else 0.0)

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

    def accumulate(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float conv/linear of this layer's geometry with other weights (and bias)."""
        raise NotImplementedError

    def accumulate_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """sum over (x, w) of accumulate(x, w), as one conv/GEMM over concatenated inputs."""
        raise NotImplementedError

    def integer_sums(self, x: torch.Tensor) -> bool:
        """Whether the proxy accumulates input ``x``'s quantized operands as exact integer
        convolutions (``accumulate_pair`` with codes): in inject mode, for convolutions on
        CPU. Exact mode keeps the float proxy: there it only shapes the gradient, and its cost
        is small beside the emulation's."""
        return False

    def plain_geometry(self) -> integer_conv.ConvGeometry | None:
        """A convolution's arguments where it pads with zeros given as numbers, so a kernel
        can take its input unpadded; None for other layers."""
        return None

    def accumulate_pair(
        self,
        x: torch.Tensor,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        codes: integer_conv.PairCodes | None = None,
        negation: sign_pair.Negation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(accumulate(x, w_pos), accumulate(x, w_neg))``, whose gradients are usually each
        other's negation (``approxctl.sign_pair``: one dense backward then, on CPU). ``codes``:
        the operands' integer codes where ``integer_sums`` holds, for exact sums; ``negation``
        as ``sign_pair`` takes it."""
        return self.accumulate(x, w_pos), self.accumulate(x, w_neg)

    def group_concat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Inputs concatenated along the reduction within each group, the order in which
        weights concatenated along dim 1 see them."""
        raise NotImplementedError

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Input as GEMM rows per group, (G, R, K_g), K ordered (in_channel, kh, kw).

        Integer inputs (operands, |value| <= 256) come back as int32: im2col runs in float32,
        which holds them exactly, since torch's unfold has no integer kernel.
        """
        raise NotImplementedError

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Weight as GEMM rows per group, (G, O_g, K_g)."""
        raise NotImplementedError

    def fold(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(G, R, O_g) GEMM output -> the layer's output layout for input ``like``."""
        raise NotImplementedError

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector (or a scalar) shaped to broadcast against outputs."""
        raise NotImplementedError

    def channel_layout(self, y: torch.Tensor) -> ChannelLayout:
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

    def accumulate(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x, pad = self._explicit_pad(x)
        return patch_grad.conv2d(x, w, bias, self.zero_padded_geometry(pad))

    def group_concat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Inputs (N, C, H, W) concatenated channel-wise *within each group*, so that group g
        sees [x1_g, x2_g, ...] (plain concatenation would move channels across groups).

        Inputs may have any strides: ConvNeXt, for one, feeds its depthwise convs a permuted
        (channels-last) tensor, which ``view`` cannot split into groups.
        """
        if len(xs) == 1:
            return xs[0]
        n, c, h, w = xs[0].shape
        g = self.groups
        return torch.cat([x.reshape(n, g, c // g, h, w) for x in xs], 2).reshape(n, -1, h, w)

    def conv_geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Input with non-zero/asymmetric padding applied, and the remaining conv arguments."""
        x, pad = self._explicit_pad(x)
        return x, {
            "stride": tuple(self.stride),
            "padding": pad,
            "dilation": tuple(self.dilation),
            "groups": self.groups,
        }

    def accumulate_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if len(terms) == 1:
            return self.accumulate(*terms[0])
        # Weights (O, C/g, kh, kw) concatenate along dim 1 per output, i.e. within each group,
        # matching group_concat's input order.
        weight = torch.cat([w for _, w in terms], 1)
        return self.accumulate(self.group_concat([x for x, _ in terms]), weight)

    def integer_sums(self, x: torch.Tensor) -> bool:
        return (
            self.mode == "inject" and self.plain_geometry() is not None
            and self.reduction_size >= integer_conv.MIN_REDUCTION and integer_conv.usable(x)
        )  # fmt: skip

    def plain_geometry(self) -> integer_conv.ConvGeometry | None:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        return self.zero_padded_geometry()

    def accumulate_pair(
        self,
        x: torch.Tensor,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        codes: integer_conv.PairCodes | None = None,
        negation: sign_pair.Negation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if codes is not None:  # integer_sums held: numba present, zero padding as numbers
            geometry = self.zero_padded_geometry()
            return sign_pair.sign_pair(
                x, w_pos, w_neg, geometry, lambda: codes.sums(geometry), negation
            )
        if not sign_pair.usable(x, w_pos, w_neg):
            return super().accumulate_pair(x, w_pos, w_neg)
        x, pad = self._explicit_pad(x)
        return sign_pair.sign_pair(
            x, w_pos, w_neg, self.zero_padded_geometry(pad), negation=negation
        )

    def zero_padded_geometry(
        self, padding: tuple[int, int] | None = None
    ) -> integer_conv.ConvGeometry:
        """The conv's arguments, for a layer with zero padding given as numbers (or for an
        input already padded by ``_explicit_pad``, with the ``padding`` it leaves)."""
        return integer_conv.ConvGeometry(
            stride=tuple(self.stride),  # type: ignore[arg-type]
            padding=tuple(self.padding) if padding is None else padding,  # type: ignore[arg-type]
            dilation=tuple(self.dilation), groups=self.groups,  # type: ignore[arg-type]
        )  # fmt: skip

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        integer = not x.dtype.is_floating_point
        if integer:
            x = x.to(torch.float32)
        x, pad = self._explicit_pad(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, pad, self.stride)  # (N, C*kh*kw, P)
        n, _, p = cols.shape
        g = self.groups
        cols = cols.view(n, g, -1, p).permute(1, 0, 3, 2)  # (G, N, P, K_g)
        cols = cols.reshape(g, n * p, -1)
        return cols.to(torch.int32) if integer else cols

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

    def channel_layout(self, y: torch.Tensor) -> ChannelLayout:
        return ChannelLayout(self.out_channels, y.shape[2] * y.shape[3])

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

    def accumulate(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, w, bias)

    def accumulate_pair(
        self,
        x: torch.Tensor,
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        codes: integer_conv.PairCodes | None = None,
        negation: sign_pair.Negation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if sign_pair.usable(x, w_pos, w_neg):
            return sign_pair.sign_pair(x, w_pos, w_neg, None, negation=negation)
        return super().accumulate_pair(x, w_pos, w_neg)

    def group_concat(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, -1)

    def accumulate_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if len(terms) == 1:
            return self.accumulate(*terms[0])
        return F.linear(torch.cat([x for x, _ in terms], -1), torch.cat([w for _, w in terms], 1))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1, x.shape[-1])

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.unsqueeze(0)

    def fold(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return y[0].reshape(*like.shape[:-1], y.shape[-1])

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def channel_layout(self, y: torch.Tensor) -> ChannelLayout:
        return ChannelLayout(self.out_features, 1)

    @property
    def reduction_size(self) -> int:
        return self.in_features


def approx_layers(model: nn.Module) -> list[tuple[str, ApproxLayer]]:
    """Every approximate layer of ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ApproxLayer)]
