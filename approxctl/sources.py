"""SOURCE strings of SPEC section 1 -> float ``nn.Module`` plus a description to rebuild it.

A SOURCE is a built-in model name (``tinyconv``, ``resnet_tiny``), a torchvision architecture name,
an import path ``package.module:ClassName``, an ``.onnx`` file, or a directory written by
``approxctl convert``/``train`` (handled by ``approxctl.io``). Weights come from ``--weights``
(.pt/.pth state dict or .safetensors). State dicts load with ``weights_only=True``; pickled
full modules only with ``trust_pickle`` (unpickling runs arbitrary code).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxctl.errors import ApproxError
from approxctl.models import BUILTIN_MODELS


@dataclass
class SourceInfo:
    """How a float model was made; stored in approx.json so the model can be rebuilt."""

    kind: str  # builtin | torchvision | import | onnx
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    weights_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "kwargs": self.kwargs,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceInfo:
        return cls(
            kind=data["kind"],
            name=data["name"],
            kwargs=dict(data.get("kwargs", {})),
            weights=data.get("weights"),
            weights_sha256=data.get("weights_sha256"),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def classify(source: str) -> str:
    """Which kind of SOURCE a string names."""
    path = Path(source)
    if path.is_dir():
        return "dir"
    if source.lower().endswith(".onnx"):
        return "onnx"
    if source in BUILTIN_MODELS:
        return "builtin"
    if ":" in source and not path.exists():
        return "import"
    if source in torchvision_names():
        return "torchvision"
    if path.suffix in (".pt", ".pth", ".safetensors"):
        raise ApproxError(
            f"'{source}' is a weights file, not a model: give the architecture as SOURCE and the "
            "file with --weights (e.g. `resnet18 --weights model.pth`)"
        )
    raise ApproxError(
        f"unknown SOURCE '{source}': give a built-in model ({', '.join(BUILTIN_MODELS)}), a "
        "torchvision model name (e.g. resnet18), package.module:ClassName, an .onnx file, or a "
        "directory written by approxctl convert/train"
    )


# ------------------------------------------------------------------ weights
def read_state_dict(
    path: Path, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor] | nn.Module:
    """Tensors from a .safetensors or .pt/.pth file (or a full module, with trust_pickle)."""
    if not path.is_file():
        raise ApproxError(f"weights file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ApproxError(f"weights file '{path}' is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ApproxError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ApproxError(
                f"{path} holds pickled Python objects (likely a full module), which can run code "
                "when loaded; save a state_dict instead, or pass --trust-pickle if you trust the "
                "file"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # arbitrary unpickling failure
            raise ApproxError(f"{path}: could not be unpickled ({inner})") from None
        del exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ApproxError(
            f"{path}: not a readable PyTorch file, truncated or corrupt ({exc})"
        ) from None
    if isinstance(obj, nn.Module):
        return obj
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints often wrap the weights; DDP prefixes every key with "module.".
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ApproxError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strict load with a message naming missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise ApproxError(f"{origin} does not fit the architecture — {'; '.join(problems)}")
    model.load_state_dict(state)


def _classifier_size(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Output count of the last linear layer in ``state``, when it differs from ``model``'s."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        return None
    key = f"{last[-1]}.weight"
    if key in state and state[key].shape[0] != model.state_dict()[key].shape[0]:
        return int(state[key].shape[0])
    return None


# ------------------------------------------------------------------ building
def _accepted(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _import_class(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ApproxError(
            f"cannot import '{module_name}' ({exc}); is the package installed or on PYTHONPATH?"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ApproxError(f"module '{module_name}' has no attribute '{attr}'") from None


def construct(info: SourceInfo) -> nn.Module:
    """The float architecture described by ``info`` (random weights; no file needed)."""
    if info.kind == "builtin":
        return BUILTIN_MODELS[info.name](**info.kwargs)
    if info.kind == "torchvision":
        import torchvision

        return torchvision.models.get_model(info.name, weights=None, **info.kwargs)
    if info.kind == "import":
        factory = _import_class(info.name)
        try:
            model = factory(**info.kwargs)
        except TypeError as exc:
            raise ApproxError(f"cannot construct {info.name}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ApproxError(f"{info.name} did not return an nn.Module")
        return model
    raise ApproxError(f"cannot rebuild a model of kind '{info.kind}'")


def build_model(
    source: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, SourceInfo]:
    """A float model in eval mode from SOURCE (not a directory) and its description."""
    kind = classify(source)
    if kind == "dir":
        raise ApproxError(f"'{source}' is a converted directory; load it with approxctl.load")
    if kind == "onnx":
        from approxctl.onnx_source import load_onnx

        return load_onnx(Path(source)), SourceInfo("onnx", str(Path(source).name))
    wanted: dict[str, Any] = {}
    for key, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if value is not None:
            wanted[key] = value
    state: dict[str, torch.Tensor] | nn.Module | None = None
    if weights is not None:
        state = read_state_dict(Path(weights), trust_pickle=trust_pickle)
        if isinstance(state, nn.Module):  # a trusted full-module pickle is the model itself
            return state.eval(), SourceInfo("pickle", str(weights))
    factory: Any
    if kind == "builtin":
        factory = BUILTIN_MODELS[source]
    elif kind == "torchvision":
        import torchvision

        factory = torchvision.models.get_model_builder(source)
    else:
        factory = _import_class(source)
    info = SourceInfo(kind, source, _accepted(factory, wanted))
    model = construct(info)
    if state is not None:
        size = _classifier_size(state, model)
        if (
            size is not None
            and num_classes is None
            and "num_classes" in _accepted(factory, {"num_classes": 1})
        ):
            info.kwargs["num_classes"] = size  # the weights say how many classes there are
            model = construct(info)
        load_weights_into(model, state, str(weights))
        info.weights = str(weights)
        info.weights_sha256 = sha256_file(Path(weights))
    return model.eval(), info
