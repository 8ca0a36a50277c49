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

from approxctl import streams
from approxctl.backends import registry
from approxctl.errors import ApproxError
from approxctl.targets.base import Target, TargetConfig, ste_round

if TYPE_CHECKING:
    from approxctl.layers import ApproxLayer


@dataclass(frozen=True)
class ScConfig(TargetConfig):
    target: ClassVar[str] = "sc"

    length: int = 32
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B
    gain: float = 1.0

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

    def __init__(self, config: ScConfig) -> None:
        self.config = config

    def quantize(self, layer: ApproxLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        length, gain = self.config.length, self.config.gain
        xn = x / layer.act_scale()
        q = {
            "a": ste_round(xn.clamp(0, 1) * length),
            "w_pos": ste_round((gain * layer.weight).clamp(0, 1) * length),
            "w_neg": ste_round((-gain * layer.weight).clamp(0, 1) * length),
        }
        if bool(layer.input_signed):
            q["a_neg"] = ste_round((-xn).clamp(0, 1) * length)
        return q

    def proxy(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """SC_act = (1 - exp(-x_pos)) - (1 - exp(-x_neg)) on the normalized accumulations."""
        inv = 1.0 / self.config.length
        a = q["a"] * inv
        w_pos, w_neg = q["w_pos"] * inv, q["w_neg"] * inv
        x_pos, x_neg = layer.accumulate_pair(a, w_pos, w_neg)
        if (
            "a_neg" in q
        ):  # negative inputs: x- w- adds to the positive stream, x- w+ to the negative
            n_pos, n_neg = layer.accumulate_pair(q["a_neg"] * inv, w_neg, w_pos)
            x_pos, x_neg = x_pos + n_pos, x_neg + n_neg
        return torch.exp(-x_neg) - torch.exp(-x_pos)

    def exact(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        a = layer.patches(q["a"].detach()).to(torch.int64)
        b_pos = layer.weight_matrix(q["w_pos"].detach()).to(torch.int64)
        b_neg = layer.weight_matrix(q["w_neg"].detach()).to(torch.int64)
        if "a_neg" in q:  # SPEC 3.2: K is [x+, x-] with b_pos = [w+, w-], b_neg = [w-, w+]
            a = torch.cat([a, layer.patches(q["a_neg"].detach()).to(torch.int64)], dim=-1)
            b_pos, b_neg = torch.cat([b_pos, b_neg], -1), torch.cat([b_neg, b_pos], -1)
        backend = registry.get(cfg.backend, a.device)

        def op(a_g: torch.Tensor, p_g: torch.Tensor, n_g: torch.Tensor) -> torch.Tensor:
            counts = backend.sc_matmul(
                a_g, p_g, n_g, cfg.length, phase_a=cfg.phase_a, phase_b=cfg.phase_b
            )
            return (counts[..., 0] - counts[..., 1]).to(torch.float32) / cfg.length

        return layer.fold(layer.integer_gemm(op, a, b_pos, b_neg), q["a"])

    def output_scale(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer.act_scale() / self.config.gain

    def describe(self, layer: ApproxLayer) -> dict[str, Any]:
        return {"length": self.config.length, "gain": self.config.gain}
