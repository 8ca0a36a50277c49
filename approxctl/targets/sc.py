"""Stochastic computing: split-unipolar LFSR streams, AND multiply, OR accumulate (SPEC 3.2).

Accumulator domain: the layer value ``(ones(pos) - ones(neg)) / L`` in [-1, 1]. Activations are
stream probabilities ``clamp(x / s_x, 0, 1)``; weights are their own probabilities
``clamp(g * w±, 0, 1)`` with the fixed per-layer gain g (never rescaled per channel, so training can
shrink sums that saturate the OR). The float output is ``value * s_x / g``, which matches the float
layer wherever the OR does not saturate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from approxctl import fused_conv, streams
from approxctl.backends import registry
from approxctl.errors import ApproxError
from approxctl.integer_conv import PairCodes
from approxctl.noise import NoiseSpec
from approxctl.proxy_ops import sc_activation
from approxctl.targets.base import Target, TargetConfig, quantize_inputs, ste_round

if TYPE_CHECKING:
    from approxctl.layers import ApproxLayer


@dataclass(frozen=True)
class ScConfig(TargetConfig):
    target: ClassVar[str] = "sc"

    length: int = 32
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B
    gain: float = 1.0
    # False: the backward is the plain conv gradient of z_pos - z_neg (the paper's Table 2
    # "no activation" column), not SC_act's.
    proxy: bool = True

    def validate(self) -> None:
        super().validate()
        streams.register_width(self.length)
        streams.validate_phase_rule(self.phase_a, "activation")
        streams.validate_phase_rule(self.phase_b, "weight")
        if not self.gain > 0:
            raise ApproxError(f"gain must be positive, got {self.gain}")


class ScTarget(Target):
    name = "sc"
    config_cls = ScConfig
    error_kind = "poly"
    summary = "stochastic computing: LFSR bitstreams, AND multiply, OR accumulate"

    def quantize(self, layer: ApproxLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations as ``q * step`` (q = round(clamp(x / s_x, 0, 1) L)), weights as q."""
        length, gain = self.config.length, self.config.gain
        step = float(layer.act_scale()) / length
        q = {
            "a_step": torch.tensor(step),
            "w_pos": ste_round((gain * layer.weight).clamp(0, 1) * length),
            "w_neg": ste_round((-gain * layer.weight).clamp(0, 1) * length),
        }
        inputs = {"a": x, "a_neg": -x} if bool(layer.input_signed) else {"a": x}
        # Integer sums take weight codes up to 127 (int8): L = 16, 32, 64.
        q.update(quantize_inputs(layer, inputs, step, length, integer=length <= 127))
        return q

    def proxy(
        self, layer: ApproxLayer, q: dict[str, torch.Tensor], noise: NoiseSpec | None = None
    ) -> torch.Tensor:
        """SC_act = (1 - exp(-x_pos)) - (1 - exp(-x_neg)) on the normalized accumulations.

        x_pos = sum_k (q_a / L)(q_w+ / L); the activations arrive as q_a * step, so the weights
        carry the remaining factor 1 / (L^2 step).
        """
        unit = 1.0 / (self.config.length**2 * float(q["a_step"]))
        w_pos, w_neg = q["w_pos"] * unit, q["w_neg"] * unit
        pos_terms, neg_terms = [(q["a"], w_pos)], [(q["a"], w_neg)]
        if (
            "a_neg" in q
        ):  # negative inputs: x- w- adds to the positive stream, x- w+ to the negative
            pos_terms.append((q["a_neg"], w_neg))
            neg_terms.append((q["a_neg"], w_pos))
        scale = layer.per_channel(self.output_scale(layer, q))
        bias = None if layer.bias is None else layer.per_channel(layer.bias)
        if not self.config.proxy:  # linear accumulation: one conv of the signed weights
            terms = [(x, wp - wn) for (x, wp), (_, wn) in zip(pos_terms, neg_terms, strict=True)]
            z = layer.accumulate_terms(terms) * scale
            return self.add_noise(layer, z if bias is None else z + bias, q, noise)
        names = ["a", "a_neg"] if "a_neg" in q else ["a"]
        geometry = layer.plain_geometry()
        inputs = [q[a] for a in names]
        if geometry is not None and fused_conv.usable(geometry, w_pos, *inputs):
            # a first layer on CPU: accumulations and proxy in one fused node
            codes = fused_conv.Codes.of(inputs, q["a_step"], q["w_pos"], q["w_neg"])
            return fused_conv.fused_conv(
                w_pos, w_neg, inputs[0], inputs[1] if len(inputs) == 2 else None, codes,
                (self.config.gain * layer.weight).detach(), geometry,
                fused_conv.Proxy("sc", unit=1.0 / self.config.length**2), scale, bias,
                noise=noise,
            )  # fmt: skip
        # The terms above as one input, K = [x+, x-] within each group, and the two streams'
        # weights: one accumulate_pair (the first layer's weight gradients by one GEMM each).
        x = layer.group_concat(inputs)
        stream_w = [torch.cat([w for _, w in terms], 1) for terms in (pos_terms, neg_terms)]
        codes = None
        if "a_codes" in q:  # inject mode on CPU: the sums as exact integer convolutions
            w_codes = [q["w_pos"].detach().to(torch.int8), q["w_neg"].detach().to(torch.int8)]
            codes = PairCodes(
                layer.group_concat([q[a + "_codes"] for a in names]),
                torch.cat(w_codes[: len(names)], 1), torch.cat(w_codes[::-1][: len(names)], 1),
                out_scale=1.0 / self.config.length**2,
                bound=self.config.length**2 * stream_w[0][0].numel(), code_max=self.config.length,
            )  # fmt: skip
        z_pos, z_neg = layer.accumulate_pair(x, stream_w[0], stream_w[1], codes)
        layout = layer.channel_layout(z_pos)
        return sc_activation(z_pos, z_neg, scale, bias, layout=layout, noise=noise)

    def exact(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        ints = self.integer_operands(q)
        backend = registry.get(cfg.backend, ints["a"].device)
        conv = getattr(backend, "sc_conv2d", None)
        if conv is not None and hasattr(layer, "conv_geometry"):  # direct conv, no im2col
            parts, b_pos, b_neg = [ints["a"]], ints["w_pos"], ints["w_neg"]
            if "a_neg" in ints:  # the same [x+, x-] concatenation, within each group
                parts.append(ints["a_neg"])
                b_pos, b_neg = torch.cat([b_pos, b_neg], 1), torch.cat([b_neg, b_pos], 1)
            x, geometry = layer.conv_geometry(layer.group_concat(parts))
            diff = conv(
                x, b_pos, b_neg, cfg.length, phase_a=cfg.phase_a, phase_b=cfg.phase_b, **geometry
            )
            return diff.to(torch.float32) / cfg.length
        a = layer.patches(ints["a"])
        b_pos = layer.weight_matrix(ints["w_pos"])
        b_neg = layer.weight_matrix(ints["w_neg"])
        if "a_neg" in ints:  # SPEC 3.2: K is [x+, x-] with b_pos = [w+, w-], b_neg = [w-, w+]
            a = torch.cat([a, layer.patches(ints["a_neg"])], dim=-1)
            b_pos, b_neg = torch.cat([b_pos, b_neg], -1), torch.cat([b_neg, b_pos], -1)

        def op(a_g: torch.Tensor, p_g: torch.Tensor, n_g: torch.Tensor) -> torch.Tensor:
            counts = backend.sc_matmul(
                a_g, p_g, n_g, cfg.length, phase_a=cfg.phase_a, phase_b=cfg.phase_b
            )
            return (counts[..., 0] - counts[..., 1]).to(torch.float32) / cfg.length

        return layer.fold(layer.integer_gemm(op, a, b_pos, b_neg), q["a"])

    def output_scale(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return (layer.act_scale() / self.config.gain).detach()

    def describe(self, layer: ApproxLayer) -> dict[str, Any]:
        out: dict[str, Any] = {"length": self.config.length, "gain": self.config.gain}
        if not self.config.proxy:
            out["proxy"] = False
        return out
