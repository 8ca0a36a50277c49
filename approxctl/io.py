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
from approxctl.sources import SourceInfo, construct, load_weights_into

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "approx.json"
ONNX_COPY = "source.onnx"


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


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``approx.json`` for a converted model into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = describe_model(model)
    source: SourceInfo | None = getattr(model, "approx_source", None)
    onnx_path = getattr(model, "approx_onnx_path", None)
    if source is not None and source.kind == "onnx" and onnx_path is not None:
        # The graph itself is the architecture: keep a copy so the directory is self-contained.
        atomic_write(directory / ONNX_COPY, lambda tmp: shutil.copyfile(onnx_path, tmp))
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


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model from ``directory`` (in ``float`` mode, eval state).

    ``model``: the float architecture, needed only when the directory was saved from a Python
    object approxctl cannot rebuild by itself (no source description).
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
        if source.kind == "onnx":
            from approxctl.onnx_source import load_onnx

            model = load_onnx(directory / ONNX_COPY)
        else:
            model = construct(source)
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
    set_mode(converted, "float")
    return converted.eval()
