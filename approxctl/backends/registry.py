"""Backend lookup: a name (or "auto") and a device -> a module implementing the three ops."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from approxctl.errors import ApproxError

# name -> (module path, devices it runs on). Order is the "auto" preference, fastest first.
_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("approxctl.backends.cpu", ("cpu",)),
    "torch": ("approxctl.backends.torch_ref", ("cpu", "cuda")),
}


def names() -> list[str]:
    return list(_BACKENDS)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_BACKENDS[name][0])
    except ImportError:
        return None


def get(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; "auto" takes the first that is available."""
    if name == "auto":
        for candidate, (_, devices) in _BACKENDS.items():
            if device.type in devices and (module := _load(candidate)) is not None:
                return module
        raise ApproxError(f"no backend runs on device '{device}'")
    if name not in _BACKENDS:
        raise ApproxError(f"unknown backend '{name}'; choose one of: auto, {', '.join(_BACKENDS)}")
    if device.type not in _BACKENDS[name][1]:
        raise ApproxError(f"backend '{name}' does not run on '{device}'")
    module = _load(name)
    if module is None:
        raise ApproxError(f"backend '{name}' is not installed (pip install 'approxctl[cuda]')")
    return module
