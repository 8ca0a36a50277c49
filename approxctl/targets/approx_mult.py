"""EvoApprox approximate multipliers as lookup tables (SPEC 3.1).

Accumulator domain: integer products ``sum_k a_q w_q``. Activations are quantized symmetrically
with one calibrated scale per tensor, weights with one scale per output channel, both to
[-(M-1), M-1] for an unsigned (sign-magnitude) table of size M, or [-127, 127] for a signed table.
The approximate multiplier has no accumulation non-linearity, so the proxy is the plain
accumulation of the quantized operands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from approxctl import integer_conv, luts, quantized_conv
from approxctl.backends import registry
from approxctl.noise import NoiseSpec
from approxctl.proxy_ops import fake_quant
from approxctl.targets.base import Target, TargetConfig, ste_round

if TYPE_CHECKING:
    from approxctl.layers import ApproxLayer


@dataclass(frozen=True)
class ApproxMultConfig(TargetConfig):
    target: ClassVar[str] = "approx-mult"

    # A bundled EvoApprox name (see `approxctl luts`) or a path to a user's .npy table.
    lut: str = luts.DEFAULT_LUT
    # Signed table indexed [a+128, b+128]? None: from the name (EvoApprox mul8s_* are signed).
    signed: bool | None = None

    def validate(self) -> None:
        super().validate()
        luts.load_lut(self.lut, signed=self.is_signed)

    @property
    def is_signed(self) -> bool:
        return luts.is_signed_lut_name(self.lut) if self.signed is None else bool(self.signed)


class ApproxMultTarget(Target):
    name = "approx-mult"
    config_cls = ApproxMultConfig
    error_kind = "poly"
    summary = "EvoApprox approximate multipliers (lookup tables), exact accumulation"

    def __init__(self, config: ApproxMultConfig) -> None:
        self.config = config
        self.signed = config.is_signed
        self.table = luts.load_lut(config.lut, signed=self.signed)
        size = self.table.shape[0]
        self.qmax = 127 if self.signed else size - 1
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self.table.to(device)
        return self._tables[device]

    def quantize(self, layer: ApproxLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        qmax = self.qmax
        step = float(layer.act_scale()) / qmax
        w, w_scale = self.quantize_weight(layer)
        return {
            "a": fake_quant(x, step, -qmax, qmax),
            "a_step": torch.tensor(step),
            "w": w,
            "w_scale": w_scale,
        }

    def quantize_weight(self, layer: ApproxLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer-valued weights (straight-through rounding) and their per-channel scale."""
        w = layer.weight
        w_scale = w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-12) / self.qmax
        # No clamp: |w| / w_scale <= qmax by construction, and a clamp would block the
        # gradient of each channel's largest weight (float rounding can land just above qmax).
        return ste_round(w / w_scale.view(-1, *([1] * (w.dim() - 1)))), w_scale

    def fused_inject(
        self, layer: ApproxLayer, x: torch.Tensor, noise: NoiseSpec
    ) -> torch.Tensor | None:
        """Convolutions on CPU: the accumulation as an exact integer convolution, the error
        drawn in the pass that writes the output (``approxctl.quantized_conv``). Not for
        layers with few products per output, which are bound by memory
        (``integer_conv.MIN_REDUCTION``)."""
        if not (
            isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
            and layer.reduction_size >= integer_conv.MIN_REDUCTION
            and quantized_conv.usable(x, self.qmax)
        ):  # fmt: skip
            return None
        w, w_scale = self.quantize_weight(layer)
        step = float(layer.act_scale()) / self.qmax
        return quantized_conv.quantized_conv2d(
            x, w, w_scale, layer.bias, step=step, qmax=self.qmax,
            geometry=layer.zero_padded_geometry(), noise=noise,
            keep_input=layer.checkpointing and torch.is_grad_enabled(),
        )  # fmt: skip

    def proxy(
        self, layer: ApproxLayer, q: dict[str, torch.Tensor], noise: NoiseSpec | None = None
    ) -> torch.Tensor:
        """The plain accumulation of the quantized operands, in float units: the float layer
        on fake-quantized activations (q_a * step) and weights (q_w * w_scale)."""
        w = q["w"] * q["w_scale"].view(-1, *([1] * (q["w"].dim() - 1)))
        return self.add_noise(layer, layer.accumulate(q["a"], w, layer.bias), q, noise)

    def exact(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        ints = self.integer_operands(q)
        backend = registry.get(self.config.backend, ints["a"].device)
        table = self.table_on(ints["a"].device)
        conv = getattr(backend, "lut_conv2d", None)
        if conv is not None and hasattr(layer, "conv_geometry"):  # skip im2col where possible
            x, geometry = layer.conv_geometry(ints["a"])
            out = conv(x, ints["w"], table, self.signed, **geometry)
            if out is not None:
                return out.to(torch.float32)
        a = layer.patches(ints["a"])
        b = layer.weight_matrix(ints["w"])

        def op(a_g: torch.Tensor, b_g: torch.Tensor) -> torch.Tensor:
            return backend.lut_matmul(a_g, b_g, table, self.signed).to(torch.float32)

        return layer.fold(layer.integer_gemm(op, a, b), q["a"])

    def output_scale(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return q["w_scale"] * q["a_step"]

    def describe(self, layer: ApproxLayer) -> dict[str, Any]:
        return {"lut": self.config.lut, "signed_table": self.signed, "qmax": self.qmax}
