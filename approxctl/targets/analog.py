"""Analog compute-in-memory with ADC-quantized partial sums (SPEC 3.3).

Accumulator domain: products ``a_q * w_q`` (8-bit unsigned inputs, 8-bit signed weights with one
scale per output channel). K is cut into arrays of ``array_size``; each array's positive- and
negative-weight partial sums go through an ``adc_bits`` ADC of full scale ``adc_max`` (products),
calibrated per layer. The proxy is the paper's HardTanh pair ``clamp(z+, 0, T) - clamp(z-, 0, T)``
with T = adc_max x number of arrays unless set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from approxctl import analog_weights, fused_conv
from approxctl.backends import registry
from approxctl.errors import ApproxError
from approxctl.functional import validate_analog_params
from approxctl.integer_conv import PairCodes
from approxctl.noise import NoiseSpec
from approxctl.proxy_ops import hardtanh_pairs
from approxctl.sign_pair import Negation
from approxctl.targets.base import Target, TargetConfig, quantize_inputs, ste_round

if TYPE_CHECKING:
    from approxctl.layers import ApproxLayer

LINEAR_ARRAY_SIZE = 64
# Partial-sum samples kept per layer and batch for choosing adc_max.
ADC_SAMPLE_ROWS = 2048
MSE_CANDIDATES = 256
MSE_BLOCK_ELEMENTS = 1 << 22  # (candidate, value) pairs evaluated at once
FIT_SAMPLES = 1 << 20


@dataclass(frozen=True)
class AnalogConfig(TargetConfig):
    target: ClassVar[str] = "analog"

    adc_bits: int = 4
    # Inputs per array; None: kh*kw for a conv (one input channel's window), 64 for linear.
    array_size: int | None = None
    # How adc_max is calibrated: "mse" (min. quantization error), "max", or "percentile:P".
    adc_calib: str = "mse"
    # T of the proxy clamp in products; None: adc_max x number of arrays.
    proxy_clamp: float | None = None
    # False: the backward is the plain conv gradient (the paper's Table 2 "no activation").
    proxy: bool = True

    def validate(self) -> None:
        super().validate()
        validate_analog_params(self.array_size or 1, self.adc_bits, 1)
        parse_adc_calib(self.adc_calib)
        if self.proxy_clamp is not None and not self.proxy_clamp > 0:
            raise ApproxError(f"proxy_clamp must be positive, got {self.proxy_clamp}")


def parse_adc_calib(text: str) -> tuple[str, float]:
    if text in ("mse", "max"):
        return text, 0.0
    if text.startswith("percentile:"):
        try:
            p = float(text.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if 0 < p <= 100:
            return "percentile", p
    raise ApproxError(
        f"adc_calib must be 'mse', 'max' or 'percentile:P' with 0 < P <= 100, got '{text}'"
    )


def choose_adc_max(partial_sums: torch.Tensor, adc_bits: int, method: str) -> int:
    """adc_max (products, >= 1) for the observed non-negative partial sums."""
    p = partial_sums.to(torch.int64).reshape(-1)
    if p.numel() == 0 or int(p.max()) <= 0:
        return 1
    kind, pct = parse_adc_calib(method)
    top = int(p.max())
    if kind == "max":
        return top
    # An even spread of at most FIT_SAMPLES partial sums is plenty for a quantile or an MSE.
    p = p[:: max(1, p.numel() // FIT_SAMPLES)]
    if kind == "percentile":
        return max(1, math.ceil(float(torch.quantile(p.double(), pct / 100))))
    levels = (1 << adc_bits) - 1
    candidates = torch.unique(torch.linspace(1, top, MSE_CANDIDATES).round().to(torch.int64))
    values, counts = torch.unique(p, return_counts=True)  # partial sums repeat a lot
    weights = counts.double()
    # All candidates at once, a block at a time (blocks bound the (candidates, values) temporaries);
    # argmin keeps the first of equal errors, as a loop over ascending candidates would.
    errors = []
    block = max(1, MSE_BLOCK_ELEMENTS // max(1, values.numel()))
    for chunk in candidates.split(block):
        c = chunk.view(-1, 1)
        codes = torch.div(2 * values * levels + c, 2 * c, rounding_mode="floor").clamp_(0, levels)
        deq = codes.double() * (c.double() / levels)
        errors.append((weights * (values.double() - deq) ** 2).sum(dim=1))
    return int(candidates[int(torch.argmin(torch.cat(errors)))])


class AnalogTarget(Target):
    name = "analog"
    config_cls = AnalogConfig
    error_kind = "gaussian"
    has_adc = True
    summary = "analog compute-in-memory: partial sums quantized by low-bit ADCs"

    def __init__(self, config: AnalogConfig) -> None:
        self.config = config
        self.levels = (1 << config.adc_bits) - 1

    def init_layer(self, layer: ApproxLayer) -> None:
        default = (
            LINEAR_ARRAY_SIZE
            if layer.channel_dim == -1
            else layer.kernel_size[0] * layer.kernel_size[1]  # type: ignore[attr-defined]
        )
        layer.array_size = self.config.array_size or default
        layer.register_buffer(
            "adc_max", torch.tensor(0, dtype=torch.int64, device=layer.weight.device)
        )
        layer._adc_samples = []

    def arrays(self, layer: ApproxLayer) -> int:
        return -(-layer.reduction_size // layer.array_size)

    def quantize(self, layer: ApproxLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w = layer.weight
        step = float(layer.act_scale()) / 255
        q = {"a_step": torch.tensor(step)}
        # The proxy's weight signs from one fused node where it serves (the weights' int8
        # codes stand in "w" then: only the exact op and the integer sums read it).
        split = analog_weights.split_weights(w, step) if self.config.proxy else None
        if split is not None:
            q |= {"w": split.codes, "w_scale": split.scale,
                  "proxy_w_pos": split.pos, "proxy_w_neg": split.neg}  # fmt: skip
        else:
            w_scale = w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-12) / 127
            q["w"] = ste_round(w / w_scale.view(-1, *([1] * (w.dim() - 1))))  # see approx_mult
            q["w_scale"] = w_scale
        inputs = {"a": x, "a_neg": -x} if bool(layer.input_signed) else {"a": x}
        q.update(quantize_inputs(layer, inputs, step, 255))
        return q

    def _clamp_t(self, layer: ApproxLayer) -> float:
        if self.config.proxy_clamp is not None:
            return float(self.config.proxy_clamp)
        return float(layer.adc_max) * self.arrays(layer)

    def proxy(
        self, layer: ApproxLayer, q: dict[str, torch.Tensor], noise: NoiseSpec | None = None
    ) -> torch.Tensor:
        """Analog_act = HardTanh pair on the positive- and negative-weight accumulations."""
        scale = layer.per_channel(self.output_scale(layer, q))
        bias = None if layer.bias is None else layer.per_channel(layer.bias)
        inputs = [q["a"]] + ([q["a_neg"]] if "a_neg" in q else [])
        if not self.config.proxy:  # linear accumulation, no clamp
            w = q["w"] / q["a_step"]  # activations arrive as q_a * step: sums come in products
            z = layer.accumulate(inputs[0], w)
            if len(inputs) == 2:  # negative inputs: the same array pass on x-, subtracted
                z = z - layer.accumulate(inputs[1], w)
            z = z * scale
            return self.add_noise(layer, z if bias is None else z + bias, q, noise)
        if "proxy_w_pos" in q:  # from analog_weights.split_weights
            w_pos, w_neg = q["proxy_w_pos"], q["proxy_w_neg"]
        else:
            w = q["w"] / q["a_step"]  # activations arrive as q_a * step: sums in products
            w_pos, w_neg = w.clamp(min=0), (-w).clamp(min=0)
        fused = self._fused_proxy(layer, q, w_pos, w_neg, scale, bias, noise)
        if fused is not None:
            return fused
        w_codes = None
        if "a_codes" in q:  # inject mode on CPU: the sums as exact integer convolutions
            w_int = q["w"].detach().to(torch.int8)
            w_codes = (w_int.clamp(min=0), w_int.neg().clamp_(min=0))
        pairs, negations = [], []
        for a in ("a", "a_neg"):
            if a not in q:
                continue
            codes = None
            if w_codes is not None:
                codes = PairCodes(
                    q[a + "_codes"], *w_codes, out_scale=1.0,
                    bound=255 * 127 * layer.reduction_size,
                )  # fmt: skip
            negations.append(Negation())  # the HardTanh pair's backward fills it in
            pairs.append(layer.accumulate_pair(q[a], w_pos, w_neg, codes, negations[-1]))
        return hardtanh_pairs(
            pairs, self._clamp_t(layer), scale, bias,
            layout=layer.channel_layout(pairs[0][0]), noise=noise, negations=negations,
        )  # fmt: skip

    def _fused_proxy(
        self,
        layer: ApproxLayer,
        q: dict[str, torch.Tensor],
        w_pos: torch.Tensor,
        w_neg: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        noise: NoiseSpec | None,
    ) -> torch.Tensor | None:
        """The proxy as one fused node (``approxctl.fused_conv``: a first layer on CPU), or
        None where that does not serve the layer."""
        geometry = layer.plain_geometry()
        inputs = [q["a"]] + ([q["a_neg"]] if "a_neg" in q else [])
        if geometry is None or not fused_conv.usable(geometry, w_pos, *inputs):
            return None
        w_int = q["w"].detach().to(torch.float32)
        codes = fused_conv.Codes.of(inputs, q["a_step"], w_int.clamp(min=0), (-w_int).clamp(min=0))
        return fused_conv.fused_conv(
            w_pos, w_neg, inputs[0], inputs[1] if len(inputs) == 2 else None,
            codes, w_int, geometry, fused_conv.Proxy("analog", t=self._clamp_t(layer)),
            scale, bias, noise=noise,
        )  # fmt: skip

    def exact(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        adc_max = int(layer.adc_max)
        ints = self.integer_operands(q)
        b = layer.weight_matrix(ints["w"])
        backend = registry.get(self.config.backend, b.device)
        bits, size = self.config.adc_bits, layer.array_size
        conv = getattr(backend, "analog_conv2d", None)
        if conv is not None and hasattr(layer, "conv_geometry"):  # direct conv, no im2col
            codes = None
            for key in ("a", "a_neg"):
                if key in ints:
                    x, geometry = layer.conv_geometry(ints[key])
                    part = conv(x, ints["w"], size, bits, adc_max, **geometry)
                    codes = part if codes is None else codes - part
            assert codes is not None
            return codes.to(torch.float32) * (adc_max / self.levels)

        def op(a_g: torch.Tensor, b_g: torch.Tensor) -> torch.Tensor:
            return backend.analog_matmul(a_g, b_g, size, bits, adc_max).to(torch.float32)

        codes = layer.integer_gemm(op, layer.patches(ints["a"]), b)
        if "a_neg" in ints:  # negative inputs run as a second pass and are subtracted (SPEC 3.3)
            codes = codes - layer.integer_gemm(op, layer.patches(ints["a_neg"]), b)
        return layer.fold(codes, q["a"]) * (adc_max / self.levels)

    def output_scale(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return q["w_scale"] * q["a_step"]

    # ------------------------------------------------------- ADC calibration
    @torch.no_grad()
    def observe_adc(self, layer: ApproxLayer, x: torch.Tensor) -> None:
        """Record a sample of the layer's array partial sums (both weight signs)."""
        ints = self.integer_operands(self.quantize(layer, x))
        b = layer.weight_matrix(ints["w"]).to(torch.float64)
        size = layer.array_size
        arrays = self.arrays(layer)
        pad = arrays * size - b.shape[-1]
        b = torch.nn.functional.pad(b, (0, pad)).view(*b.shape[:2], arrays, size)
        for key in ("a", "a_neg"):
            if key not in ints:
                continue
            rows = layer.patches(ints[key]).to(torch.float64)
            if rows.shape[1] > ADC_SAMPLE_ROWS:  # an even spread of rows keeps this cheap
                rows = rows[:, :: rows.shape[1] // ADC_SAMPLE_ROWS]
            rows = torch.nn.functional.pad(rows, (0, pad)).view(*rows.shape[:2], arrays, size)
            for w in (b.clamp(min=0), (-b).clamp(min=0)):
                p = torch.einsum("grcs,gocs->groc", rows, w).round().to(torch.int64)
                layer._adc_samples.append(p.reshape(-1).cpu())

    def finish_adc_calibration(self, layer: ApproxLayer) -> None:
        samples = torch.cat(layer._adc_samples) if layer._adc_samples else torch.zeros(0)
        layer.adc_max.fill_(choose_adc_max(samples, self.config.adc_bits, self.config.adc_calib))
        layer._adc_samples = []

    def describe(self, layer: ApproxLayer) -> dict[str, Any]:
        return {
            "adc_bits": self.config.adc_bits,
            "array_size": layer.array_size,
            "arrays": self.arrays(layer),
            "adc_max": int(layer.adc_max),
            "adc_calib": self.config.adc_calib,
        }
