"""Converted models on disk: ``model.safetensors`` + ``approx.json`` (SPEC sections 2 and 5).

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash never leaves a half-written file under its final name. ``load`` rebuilds the float
architecture from the stored source description (or from a ``model`` the caller passes), converts
it with the stored per-layer options and loads the weights and calibrated buffers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxctl import targets
from approxctl.convert import convert, set_mode
from approxctl.errors import ApproxError
from approxctl.layers import approx_layers
from approxctl.sources import (
    SourceInfo,
    construct,
    load_pickled_module,
    load_weights_into,
    sha256_file,
)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "approx.json"
ONNX_COPY = "source.onnx"
PICKLE_COPY = "source.pt"
# Sources whose architecture lives in a file: the directory keeps a copy of that file.
_SOURCE_COPIES = {"onnx": ONNX_COPY, "pickle": PICKLE_COPY}
_SOURCE_ATTRS = {"onnx": "approx_onnx_path", "pickle": "approx_pickle_path"}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _state_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage; each entry gets its own contiguous copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def describe_model(model: nn.Module) -> dict[str, Any]:
    plan = getattr(model, "approx_plan", None)
    if plan is None:
        raise ApproxError("the model was not made by approxctl.convert; convert it first")
    layers = {}
    for name, layer in approx_layers(model):
        layers[name] = {
            **layer.describe(),
            "options": layer.config.to_dict(),
            "error_model": layer.error_model.stats() if bool(layer.error_model.fitted) else None,
        }
    source: SourceInfo | None = getattr(model, "approx_source", None)
    return {
        "format": "approxctl",
        "format_version": FORMAT_VERSION,
        "target": plan.target,
        "options": plan.config.to_dict(),
        "exclude": list(plan.exclude),
        "type_overrides": plan.type_overrides,
        "layer_overrides": plan.layer_overrides,
        "excluded": plan.excluded,
        "unsupported": plan.unsupported,
        "source": source.to_dict() if source is not None else None,
        "layers": layers,
    }


def _source_file(model: nn.Module, source: SourceInfo | None) -> Path | None:
    """The file holding the architecture of an ONNX or pickled-module source, if any."""
    if source is None or source.kind not in _SOURCE_COPIES:
        return None
    path = getattr(model, _SOURCE_ATTRS[source.kind], None) or source.weights
    if path is None or not Path(path).is_file():
        raise ApproxError(
            f"the model was converted from the {source.kind} file '{path}', which the saved "
            "directory must keep a copy of, but it is not there; set "
            f"model.{_SOURCE_ATTRS[source.kind]} to the file's path"
        )
    return Path(path)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``approx.json`` for a converted model into ``directory``.

    A model converted from an ONNX graph (or a trusted pickled module) also gets a copy of that
    file, ``source.onnx`` (``source.pt``), so the directory reloads without the original.
    ``approx.json`` is written last: a directory without it is not a (finished) saved model.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = describe_model(model)
    source: SourceInfo | None = getattr(model, "approx_source", None)
    source_file = _source_file(model, source)  # checked before anything is written
    if source is not None and source_file is not None:
        copy = directory / _SOURCE_COPIES[source.kind]
        if source.kind == "onnx":
            from approxctl.onnx_source import save_copy

            # The graph is the architecture; external tensor data is inlined into the copy.
            atomic_write(copy, lambda tmp: save_copy(source_file, tmp, f"{ONNX_COPY}.data"))
        else:
            atomic_write(copy, lambda tmp: shutil.copyfile(source_file, tmp))
    state = _state_for_safetensors(model)
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise ApproxError(
            f"'{directory}' is not a converted model directory: {META_FILE} is missing"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApproxError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != "approxctl":
        raise ApproxError(f"{path} was not written by approxctl")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ApproxError(
            f"{path} has format version {version}, newer than this approxctl reads "
            f"({FORMAT_VERSION}); upgrade approxctl"
        )
    return meta


def load(
    directory: str | Path, model: nn.Module | None = None, *, trust_pickle: bool = False
) -> nn.Module:
    """Rebuild a converted model from ``directory`` (in ``float`` mode, eval state).

    ``model``: the float architecture, needed only when the directory was saved from a Python
    object approxctl cannot rebuild by itself (no source description). ``trust_pickle``: allow
    unpickling the directory's ``source.pt`` when it was converted from a pickled full module.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory)
    source = SourceInfo.from_dict(meta["source"]) if meta.get("source") else None
    if model is None:
        if source is None:
            raise ApproxError(
                f"{directory} was saved from a Python model approxctl cannot rebuild; "
                "pass the float architecture: approxctl.load(dir, model=MyNet())"
            )
        model = _rebuild(directory, source, trust_pickle=trust_pickle)
    config = targets.TARGETS[targets.canonical_name(meta["target"])].config_cls.from_dict(
        meta["options"]
    )
    converted = convert(
        model,
        meta["target"],
        exclude=meta.get("exclude", ()),
        type_overrides=meta.get("type_overrides"),
        layer_overrides=meta.get("layer_overrides"),
        **{k: v for k, v in config.to_dict().items() if k not in ("target", "version")},
    )
    try:
        state = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ApproxError(
            f"{directory / MODEL_FILE}: not a readable safetensors file ({exc})"
        ) from None
    load_weights_into(converted, state, str(directory / MODEL_FILE))
    converted.approx_source = source  # type: ignore[assignment]
    if source is not None and source.kind in _SOURCE_COPIES:
        copy = directory / _SOURCE_COPIES[source.kind]
        if copy.is_file():  # so that saving the loaded model elsewhere copies it along
            setattr(converted, _SOURCE_ATTRS[source.kind], str(copy))
    set_mode(converted, "float")
    return converted.eval()


def _rebuild(directory: Path, source: SourceInfo, *, trust_pickle: bool) -> nn.Module:
    """The float architecture of a saved model, without the original SOURCE file."""
    if source.kind not in _SOURCE_COPIES:
        return construct(source)
    copy = directory / _SOURCE_COPIES[source.kind]
    if not copy.is_file():
        raise ApproxError(
            f"{directory} was converted from the {source.kind} file '{source.weights}' but its "
            f"copy {copy} is missing; convert again, or pass the float model: "
            "approxctl.load(dir, model=...)"
        )
    if source.kind == "onnx":
        from approxctl.onnx_source import load_onnx

        return load_onnx(copy)
    if not trust_pickle:
        raise ApproxError(
            f"{directory} was converted from a pickled full module; rebuilding it unpickles "
            f"{copy}, which can run code: pass --trust-pickle (approxctl.load(dir, "
            "trust_pickle=True)) if you trust it"
        )
    if source.weights_sha256 and sha256_file(copy) != source.weights_sha256:
        raise ApproxError(
            f"{copy} is not the file the model was converted from (its SHA-256 differs); "
            "refusing to unpickle it"
        )
    return load_pickled_module(copy, trust_pickle=True)
