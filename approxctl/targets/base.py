"""What every hardware target provides, and the registry that names them.

A target is a frozen config dataclass (what approx.json stores and recipes/CLI flags fill in) plus
a ``Target`` object that knows the hardware's arithmetic for one layer:

* ``quantize``: float input and weight -> the integer operands the hardware sees, and the same
  values as differentiable floats (straight-through rounding) for the proxy;
* ``proxy``: the paper's activation proxy (section 3.1), as float outputs (scale and bias applied);
* ``exact``: the bit-exact functional op (SPEC section 3) in the accumulator domain, no gradient;
* ``output_scale``: the per-output-channel factor from the accumulator domain to float.

The approximate layer (``approxctl.layers``) wires these into the three modes. Adding a target
is adding one module here and one line in ``targets/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from approxctl import integer_conv
from approxctl.errors import ApproxError
from approxctl.noise import NoiseSpec, add_error
from approxctl.proxy_ops import fake_quant

if TYPE_CHECKING:
    from approxctl.layers import ApproxLayer


@dataclass(frozen=True)
class TargetConfig:
    """Base of the per-target option dataclasses; serialisable with a type tag and a version."""

    target: ClassVar[str] = ""
    version: ClassVar[int] = 1

    # Error-model options shared by all targets (SPEC section 4).
    poly_degree: int = 10
    poly_bins: int = 30
    # Factor on the injected error's standard deviation (1: as fitted, the paper's and SPEC's
    # model; 0: only the mean). docs/training.md says when less than 1 helps.
    noise_scale: float = 1.0
    # "auto" picks the fastest backend for the tensors' device; see approxctl.backends.
    backend: str = "auto"

    def validate(self) -> None:
        if not 0 <= self.poly_degree <= 20:
            raise ApproxError(f"poly_degree must be in [0, 20], got {self.poly_degree}")
        if self.poly_bins < 2:
            raise ApproxError(f"poly_bins must be at least 2, got {self.poly_bins}")
        scale = self.noise_scale
        if isinstance(scale, bool) or not (isinstance(scale, int | float) and 0 <= scale <= 10):
            raise ApproxError(f"noise_scale must be a number in [0, 10], got {self.noise_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetConfig:
        data = dict(data)
        tag = data.pop("target", cls.target)
        version = data.pop("version", cls.version)
        if tag != cls.target:
            raise ApproxError(f"options are for target '{tag}', not '{cls.target}'")
        if not isinstance(version, int) or version > cls.version:
            raise ApproxError(
                f"target options have format version {version}, newer than this approxctl "
                f"understands ({cls.version}); upgrade approxctl"
            )
        return cls.with_options(**data)

    @classmethod
    def with_options(cls, base: TargetConfig | None = None, **options: Any) -> TargetConfig:
        """A validated config from ``base`` (or the defaults) with ``options`` replaced."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ApproxError(
                f"unknown option(s) {', '.join(unknown)} for target '{cls.target}'; "
                f"valid options: {', '.join(known)}"
            )
        values = dataclasses.asdict(base) if base is not None else {}
        for name, value in options.items():
            default = known[name].default
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        config = cls(**values)
        config.validate()
        return config


class Target(ABC):
    """The arithmetic of one kind of approximate hardware, for one layer at a time."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TargetConfig]]
    # "poly": type-1 injection (error binned by proxy output, polynomial mean/std);
    # "gaussian": type-2 injection (one mean/std per layer). SPEC section 4.
    error_kind: ClassVar[str]
    summary: ClassVar[str]
    # Targets with ADCs get a second calibration pass (observe_adc / finish_adc_calibration).
    has_adc: ClassVar[bool] = False

    def __init__(self, config: TargetConfig) -> None:
        self.config = config

    def init_layer(self, layer: ApproxLayer) -> None:  # noqa: B027 - optional hook
        """Register target-specific buffers and resolve per-layer defaults."""

    @abstractmethod
    def quantize(self, layer: ApproxLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Integer operands (int64) and their straight-through float twins, by name."""

    def integer_operands(self, q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The int64 operands the hardware sees, from ``quantize``'s output (no gradient).

        Activations come as ``q * a_step`` floats; weights as integer-valued floats.
        """
        step = q["a_step"]
        ints = {}
        for key, value in q.items():
            if key in ("a", "a_neg"):
                ints[key] = torch.round(value.detach() / step).to(torch.int64)
            elif key.startswith("w") and key != "w_scale":
                ints[key] = value.detach().to(torch.int64)
        return ints

    @abstractmethod
    def proxy(
        self, layer: ApproxLayer, q: dict[str, torch.Tensor], noise: NoiseSpec | None = None
    ) -> torch.Tensor:
        """The differentiable proxy of the layer's accumulation, as float outputs
        ``proxy_acc * output_scale + bias``; with ``noise`` (inject mode), plus the error drawn
        at ``proxy_acc``, times ``output_scale``, its gradient passing straight through."""

    def add_noise(
        self,
        layer: ApproxLayer,
        y: torch.Tensor,
        q: dict[str, torch.Tensor],
        noise: NoiseSpec | None,
    ) -> torch.Tensor:
        """``y`` plus the injected error, for proxies that do not draw it themselves. Adds in
        place: ``y`` must be a fresh output that no autograd node saved (a conv's is not)."""
        if noise is None:
            return y
        scale = layer.per_channel(self.output_scale(layer, q))
        bias = layer.per_channel(layer.bias.detach()) if layer.bias is not None else 0.0
        layout = layer.channel_layout(y)
        return add_error(
            y, noise, scale=scale, bias=torch.as_tensor(bias), layout=layout, inplace=True
        )

    def fused_inject(
        self, layer: ApproxLayer, x: torch.Tensor, noise: NoiseSpec
    ) -> torch.Tensor | None:
        """Inject mode's whole forward (quantization, proxy, error) as one fused op, where the
        target has one for this layer and input; None: the layer composes it from ``quantize``
        and ``proxy``. Must give what those give, up to the rounding of the accumulation."""
        return None

    @abstractmethod
    def exact(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bit-exact hardware result in the accumulator domain (float tensor, no grad)."""

    @abstractmethod
    def output_scale(self, layer: ApproxLayer, q: dict[str, torch.Tensor]) -> torch.Tensor:
        """Factor (scalar or per output channel, no gradient) from the accumulator domain to
        float outputs."""

    def observe_adc(self, layer: ApproxLayer, x: torch.Tensor) -> None:  # noqa: B027
        """Second calibration pass (only targets with ADCs need it)."""

    def finish_adc_calibration(self, layer: ApproxLayer) -> None:  # noqa: B027
        """Turn what ``observe_adc`` saw into the layer's ADC settings."""

    def describe(self, layer: ApproxLayer) -> dict[str, Any]:
        """Resolved per-layer settings for reports and approx.json."""
        return {}


def quantize_inputs(
    layer: ApproxLayer,
    inputs: dict[str, torch.Tensor],
    step: float,
    qmax: int,
    *,
    integer: bool = True,
) -> dict[str, torch.Tensor]:
    """``fake_quant(x, step, 0, qmax)`` of each named input (``a``, ``a_neg``), and where the
    layer accumulates in integers (``layer.integer_sums``; ``integer``: the target's operands
    fit it), their uint8 codes as ``a_codes``, ``a_neg_codes``: none unless every input has
    them (a NaN input has none)."""
    if not (integer and qmax <= 255 and layer.integer_sums(inputs["a"])):
        return {name: fake_quant(x, step, 0, qmax) for name, x in inputs.items()}
    out, codes = {}, {}
    for name, x in inputs.items():
        out[name], codes[name + "_codes"] = integer_conv.fake_quant_codes(x, step, qmax)
    if all(c is not None for c in codes.values()):
        out.update(codes)
    return out


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even, like torch.round) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()
