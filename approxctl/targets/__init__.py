"""Hardware targets by name: ``sc``, ``approx-mult`` (alias ``am``), ``analog``."""

from __future__ import annotations

from typing import Any

from approxctl.errors import ApproxError
from approxctl.targets.analog import AnalogConfig, AnalogTarget
from approxctl.targets.approx_mult import ApproxMultConfig, ApproxMultTarget
from approxctl.targets.base import Target, TargetConfig
from approxctl.targets.sc import ScConfig, ScTarget

TARGETS: dict[str, type[Target]] = {
    "sc": ScTarget,
    "approx-mult": ApproxMultTarget,
    "analog": AnalogTarget,
}
ALIASES = {"am": "approx-mult"}

__all__ = [
    "ALIASES",
    "TARGETS",
    "AnalogConfig",
    "ApproxMultConfig",
    "ScConfig",
    "Target",
    "TargetConfig",
    "canonical_name",
    "make_config",
    "make_target",
]


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TARGETS:
        choices = ", ".join([*TARGETS, *ALIASES])
        raise ApproxError(f"unknown target '{name}'; choose one of: {choices}")
    return name


def make_config(name: str, base: TargetConfig | None = None, **options: Any) -> TargetConfig:
    """The validated option dataclass of target ``name``."""
    cls = TARGETS[canonical_name(name)].config_cls
    return cls.with_options(base, **options)


def make_target(config: TargetConfig) -> Target:
    return TARGETS[canonical_name(config.target)](config)  # type: ignore[call-arg]
