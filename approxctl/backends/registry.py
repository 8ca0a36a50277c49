"""Backend lookup: a name (or "auto") and a device -> a module implementing the three ops.

"auto" takes the first backend in ``_BACKENDS`` order that runs on the device and imports:
``cpu`` on CPU tensors, ``cupy`` on CUDA tensors when CuPy is installed, else ``torch``. The
environment variable ``APPROXCTL_BACKEND`` (a backend name) overrides "auto" on the devices that
backend runs on, e.g. ``APPROXCTL_BACKEND=torch`` forces the reference everywhere and
``APPROXCTL_BACKEND=cupy`` makes a missing CuPy an error instead of a silent fallback. An
explicit name (``--backend``, ``backend=``) always wins over the environment.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from approxctl.errors import ApproxError

# name -> (module path, devices it runs on). Order is the "auto" preference, fastest first.
_BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("approxctl.backends.cpu", ("cpu",)),
    "cupy": ("approxctl.backends.cupy_backend", ("cuda",)),
    "torch": ("approxctl.backends.torch_ref", ("cpu", "cuda")),
}

ENV_VAR = "APPROXCTL_BACKEND"


def names() -> list[str]:
    return list(_BACKENDS)


@functools.cache  # a failed import (no cupy) is not retried on every layer call
def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_BACKENDS[name][0])
    except ImportError:
        return None


def available(name: str) -> bool:
    """Whether backend ``name`` imports (CuPy installed and usable, for "cupy")."""
    return _load(name) is not None


def forced() -> str:
    """The backend ``APPROXCTL_BACKEND`` names ("" when unset or "auto")."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    return "" if name == "auto" else name


def get(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; "auto" takes the first that is available."""
    if name == "auto":
        chosen = forced()
        if chosen:
            if chosen not in _BACKENDS:
                raise ApproxError(
                    f"{ENV_VAR}={chosen!r} is not a backend; choose one of: auto, "
                    f"{', '.join(_BACKENDS)}"
                )
            if device.type in _BACKENDS[chosen][1]:
                return get(chosen, device)
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
