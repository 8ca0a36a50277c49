"""SOURCE strings of SPEC section 1 -> float ``nn.Module`` plus a description to rebuild it.

A SOURCE is a built-in model name (``tinyconv``, ``resnet_tiny``), a torchvision architecture name,
an import path ``package.module:ClassName``, an ``.onnx`` file, a ``.pt``/``.pth`` file holding a
pickled full module (only with ``trust_pickle``), or a directory written by ``approxctl
convert``/``train`` (handled by ``approxctl.io``). Weights come from ``--weights`` (.pt/.pth state
dict, possibly wrapped in a checkpoint dict or with DDP ``module.`` prefixes, or .safetensors).
State dicts load with ``weights_only=True``, which never runs code; a file that needs more is
inspected with ``pickletools`` (without unpickling) and refused unless ``trust_pickle``.

``SourceInfo`` is what approx.json stores: architectures named by string are rebuilt by name;
ONNX and pickle sources are rebuilt from the copy ``approxctl.io.save`` keeps of their file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import io
import pickle
import pickletools
import warnings
import zipfile
from collections import OrderedDict
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

    kind: str  # builtin | torchvision | import | onnx | pickle
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
    """Which kind of SOURCE a string names: dir, onnx, pickle, builtin, import or torchvision."""
    path = Path(source)
    if path.is_dir():
        return "dir"
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth") and path.is_file():
        return "pickle"  # a full pickled module (needs trust_pickle); a state dict is refused
    if source in BUILTIN_MODELS:
        return "builtin"
    if ":" in source and not path.exists():
        return "import"
    if source in torchvision_names():
        return "torchvision"
    if suffix in (".pt", ".pth", ".safetensors"):
        hint = "does not exist" if not path.exists() else "holds weights only, not a model"
        raise ApproxError(
            f"'{source}' {hint}: give the architecture as SOURCE and a weights file with "
            "--weights (e.g. `resnet18 --weights model.pth`)"
        )
    raise ApproxError(
        f"unknown SOURCE '{source}': give a built-in model ({', '.join(BUILTIN_MODELS)}), a "
        "torchvision model name (e.g. resnet18), package.module:ClassName, an .onnx file, or a "
        "directory written by approxctl convert/train"
    )


# ------------------------------------------------------------------ weights
# Wrappers training scripts put around a state dict, and prefixes DDP / torch.compile add.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(
    path: Path, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor] | nn.Module:
    """Tensors from a .safetensors or .pt/.pth file (or a full module, with trust_pickle).

    ``.pt``/``.pth`` files load with ``torch.load(weights_only=True)``, which never runs code.
    When that refuses the file, the pickle is inspected without running it: a well-formed pickle
    that references Python globals (a full module, or worse) is refused unless ``trust_pickle``;
    anything else is reported as corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ApproxError(f"weights file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ApproxError(f"weights file '{path}' is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ApproxError(
                f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
            ) from None
    if _is_torchscript(path):
        raise ApproxError(
            f"{path} is a TorchScript archive (torch.jit.save); approxctl needs the Python model: "
            "save model.state_dict() and give the architecture as SOURCE"
        )
    try:
        with warnings.catch_warnings():  # refusals are explained below; this one is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        globals_ = _pickle_globals(path)
        if globals_ is None:  # no well-formed pickle: torch.load found garbage, not code
            raise ApproxError(
                f"{path}: not a readable PyTorch file, truncated or corrupt (no valid pickle "
                "data in it)"
            ) from None
        if not trust_pickle:
            named = f" (it references {', '.join(globals_[:3])})" if globals_ else ""
            raise ApproxError(
                f"{path} holds pickled Python objects{named}, which can run code when loaded; "
                "save model.state_dict() instead, or pass --trust-pickle if you trust the file"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # arbitrary unpickling failure
            raise ApproxError(
                f"{path}: could not be unpickled ({type(inner).__name__}: {_first_line(inner)})"
            ) from None
    except Exception as exc:  # weights_only loading runs no code; anything else is a bad file
        raise ApproxError(
            f"{path}: not a readable PyTorch file, truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if isinstance(obj, nn.Module):
        return obj
    return _unwrap_state_dict(obj, path)


def _first_line(exc: BaseException) -> str:
    """The gist of an exception message: its first line, cut after the first sentence."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) > 120 and ". " in line:
        line = line[: line.index(". ") + 1]
    return line


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _pickle_globals(path: Path) -> list[str] | None:
    """Python globals a torch file's pickles reference, read without unpickling anything.

    ``None`` when the file holds no well-formed pickle that references a global: then
    ``torch.load`` refused it for being corrupt, not for being dangerous.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name is not None else b""
        else:
            data = path.read_bytes()
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError):
        return None
    found: list[str] = []
    offset = 0
    # A legacy (non-zip) torch file is several pickles in a row followed by raw storage bytes.
    while offset < len(data):
        strings: list[str] = []
        stream = io.BytesIO(data[offset:])
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # genops raises ValueError and friends on a malformed stream
            break
        offset += stream.tell()
    if not found:
        return None
    plumbing = ("torch._utils.", "collections.", "torch.serialization.", "_codecs.")
    return [
        g for g in dict.fromkeys(found) if not g.startswith(plumbing) and not g.endswith("Storage")
    ]


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor] | nn.Module:
    # Training checkpoints often wrap the weights; DDP prefixes every key with "module.".
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict | nn.Module):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):  # a trusted checkpoint holding the module itself
        return obj
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ApproxError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors); "
            "save model.state_dict()"
        )
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strict load with a message naming missing, unexpected and mis-shaped keys.

    BatchNorm's ``num_batches_tracked`` counters, absent from old checkpoints, are the one thing
    allowed to be missing (they do not affect eval-mode outputs).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise ApproxError(
            f"{origin} does not fit the architecture — {'; '.join(problems)}; check the "
            "architecture, its options (e.g. number of classes) and the weights file"
        )
    merged = OrderedDict((k, state.get(k, v)) for k, v in own.items())
    # Modules with versioned state (torchvision's MNASNet, old BatchNorm) read the versions in
    # ``_metadata``; torch.save keeps it, safetensors files do not: those are the current ones.
    merged._metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(merged)


def _classifier_size(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Output count of the last linear layer in ``state``, when it differs from ``model``'s."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        return None
    key = f"{last[-1]}.weight"
    own = model.state_dict()
    if key in state and key in own and state[key].shape[0] != own[key].shape[0]:
        return int(state[key].shape[0])
    return None


# ------------------------------------------------------------------ building
def _accepted(kind: str, factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The data-derived options (classes, channels, image size) ``factory`` takes."""
    if kind == "torchvision":
        # Builders take **kwargs and hand them to the model class, which knows num_classes
        # but not in_channels or image_size: those would be a TypeError.
        return {k: v for k, v in kwargs.items() if k == "num_classes"}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and C extensions without a signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ApproxError(f"import path '{path}' must look like package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ApproxError(
            f"cannot import '{module_name}' ({exc}); is the package installed or on PYTHONPATH?"
        ) from None
    except Exception as exc:  # the module itself raised while importing
        raise ApproxError(
            f"importing '{module_name}' failed ({type(exc).__name__}: {exc})"
        ) from None
    obj: Any = module
    for part in attr.split("."):  # Outer.Inner works too
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ApproxError(f"module '{module_name}' has no attribute '{attr}'") from None
    if not callable(obj):
        raise ApproxError(f"'{path}' is not a class or function that builds a model")
    return obj


def construct(info: SourceInfo) -> nn.Module:
    """The float architecture described by ``info`` (random weights; no file needed)."""
    factory: Any
    if info.kind == "builtin":
        if info.name not in BUILTIN_MODELS:
            raise ApproxError(f"unknown built-in model '{info.name}'")
        factory = BUILTIN_MODELS[info.name]
    elif info.kind == "torchvision":
        import torchvision

        factory = functools.partial(torchvision.models.get_model, info.name, weights=None)
    elif info.kind == "import":
        factory = import_object(info.name)
    elif info.kind in ("onnx", "pickle"):
        raise ApproxError(
            f"a model from {info.kind} source '{info.name}' is rebuilt from its file, not by name"
        )
    else:
        raise ApproxError(f"cannot rebuild a model of kind '{info.kind}'")
    args = ", ".join(f"{k}={v!r}" for k, v in info.kwargs.items())
    try:
        model = factory(**info.kwargs)
    except (TypeError, ValueError) as exc:
        raise ApproxError(f"cannot construct {info.name}({args}): {exc}") from None
    if not isinstance(model, nn.Module):
        raise ApproxError(f"{info.name}({args}) returned {type(model).__name__}, not an nn.Module")
    return model


def load_pickled_module(path: str | Path, *, trust_pickle: bool) -> nn.Module:
    """A full module pickled with ``torch.save(model)`` (runs the file's code: needs trust)."""
    obj = read_state_dict(Path(path), trust_pickle=trust_pickle)
    if not isinstance(obj, nn.Module):
        raise ApproxError(
            f"'{path}' holds a state dict, not a model: give the architecture as SOURCE and the "
            f"file with --weights (e.g. `resnet18 --weights {path}`)"
        )
    return obj


def build_model(
    source: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, SourceInfo]:
    """A float model in eval mode from SOURCE (not a directory) and its description.

    ``num_classes``, ``in_channels`` and ``image_size`` are passed to architectures that take
    them; with ``weights``, the classifier size in the weights wins over ``num_classes`` unless
    that was given.
    """
    kind = classify(source)
    if kind == "dir":
        raise ApproxError(f"'{source}' is a converted directory; load it with approxctl.load")
    if kind in ("onnx", "pickle"):
        if weights is not None:
            raise ApproxError(
                f"'{source}' holds its own weights; drop --weights (or give an architecture name "
                "as SOURCE)"
            )
        path = Path(source)
        if kind == "onnx":
            from approxctl.onnx_source import load_onnx

            model = load_onnx(path)
            name = path.name
        else:
            model = load_pickled_module(path, trust_pickle=trust_pickle)
            name = f"{type(model).__module__}.{type(model).__qualname__}"
        info = SourceInfo(kind, name, weights=str(path), weights_sha256=sha256_file(path))
        return model.eval(), info
    wanted: dict[str, Any] = {}
    for key, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if value is not None:
            wanted[key] = value
    state: dict[str, torch.Tensor] | None = None
    if weights is not None:
        loaded = read_state_dict(Path(weights), trust_pickle=trust_pickle)
        # A trusted full module lends its weights to the named architecture, which stays
        # rebuildable by name.
        state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    factory: Any
    if kind == "builtin":
        factory = BUILTIN_MODELS[source]
    elif kind == "torchvision":
        import torchvision

        factory = torchvision.models.get_model_builder(source)
    else:
        factory = import_object(source)
    info = SourceInfo(kind, source, _accepted(kind, factory, wanted))
    model = construct(info)
    if state is not None:
        size = _classifier_size(state, model)
        if (
            size is not None
            and num_classes is None
            and _accepted(kind, factory, {"num_classes": 1})
        ):
            info.kwargs["num_classes"] = size  # the weights say how many classes there are
            model = construct(info)
        load_weights_into(model, state, str(weights))
        info.weights = str(weights)
        info.weights_sha256 = sha256_file(Path(weights))
    return model.eval(), info
