"""Converted models on disk: ``model.safetensors`` + ``approx.json`` (SPEC sections 2 and 5).

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash never leaves a half-written file under its final name. ``load`` rebuilds the float
architecture from the stored source description (or from a ``model`` the caller passes), converts
it with the stored per-layer options and loads the weights and calibrated buffers.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
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
    import_object,
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


TMP_SUFFIX = ".tmp"  # temporaries are named ".NAME.XXXXXXXX.tmp" beside the final file
_LOW_SPACE = 1 << 20  # bytes free below which a failed write is reported as a full disk


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path, *, directory: bool = False) -> None:
    """Flush ``path`` to the disk, so a power cut cannot leave a renamed but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:  # some file systems cannot open folders; the rename still happened
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _write_error(exc: Exception, path: Path) -> Exception:
    """``exc`` from writing ``path``, as an ``OSError`` naming ``path`` when it is one.

    Libraries report a full disk in their own ways (safetensors: ``SafetensorError`` "os error
    28", torch.save: ``RuntimeError`` "unexpected pos"); the free space tells.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    text = str(exc)
    try:
        low = shutil.disk_usage(path.parent).free < _LOW_SPACE
    except OSError:
        low = False
    if low or "No space left" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


def stage(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling of ``path``, flush it, return ``tmp``.

    On failure the temporary is removed and the error (an ``OSError`` naming ``path`` for
    I/O problems, ``errno.ENOSPC`` for a full disk) propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            write(tmp)
            _fsync(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        except Exception as exc:
            error = _write_error(exc, path)
            if error is exc:
                raise
            raise error from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    A crash or kill at any moment leaves either the old file or the new one under ``path``
    (never a part of it); at worst a stray ``.NAME.*.tmp`` file stays beside it.
    """
    atomic_write_all([(Path(path), write)])


def atomic_write_all(items: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files as one unit: all are staged first, then renamed in order.

    If any write fails (a full disk, a permission), no file is replaced or created and the
    temporaries are removed; a folder this call created and left empty is removed too. Put the
    file that marks the set complete last (``approx.json``): it is removed before the renames
    begin, so a kill between two renames leaves the set visibly unfinished, never mixed.
    """
    items = [(Path(path), write) for path, write in items]
    new_dirs = []
    for path, _ in items:
        for parent in (path.parent, *path.parent.parents):
            if parent.exists():
                break
            new_dirs.append(parent)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in items:
            staged.append((stage(path, write), path))
        if len(staged) > 1:
            staged[-1][1].unlink(missing_ok=True)
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in sorted(set(new_dirs), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    for folder in dict.fromkeys(path.parent for path, _ in items):
        _fsync(folder, directory=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


_STALE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what ``stage`` names its temporaries


def remove_stale_temporaries(directory: Path, subfolders: Sequence[str] = ()) -> list[Path]:
    """Delete the ``.NAME.XXXXXXXX.tmp`` files a killed run left in ``directory`` (and in the
    named subfolders; nothing else is searched)."""
    removed = []
    for folder in (Path(directory), *(Path(directory) / sub for sub in subfolders)):
        if not folder.is_dir():
            continue
        for tmp in folder.iterdir():
            if _STALE.match(tmp.name) and tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


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
    The files are staged as temporaries and renamed into place only when all were written;
    ``approx.json`` comes last: a directory without it is not a (finished) saved model.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    meta = describe_model(model)
    source: SourceInfo | None = getattr(model, "approx_source", None)
    source_file = _source_file(model, source)  # checked before anything is written
    files: list[tuple[Path, Callable[[Path], None]]] = []
    if source is not None and source_file is not None:
        copy = directory / _SOURCE_COPIES[source.kind]
        if source.kind == "onnx":
            from approxctl.onnx_source import save_copy

            # The graph is the architecture; external tensor data is inlined into the copy.
            files.append((copy, lambda tmp: save_copy(source_file, tmp, f"{ONNX_COPY}.data")))
        else:
            files.append((copy, lambda tmp: shutil.copyfile(source_file, tmp)))
    state = _state_for_safetensors(model)
    text = json.dumps(meta, indent=2) + "\n"
    files.append((directory / MODEL_FILE, lambda tmp: save_file(state, str(tmp))))
    files.append((directory / META_FILE, lambda tmp: tmp.write_text(text)))
    # All or nothing: a failed save leaves an earlier model in ``directory`` as it was.
    atomic_write_all(files)
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ApproxError(f"{path} has no valid format_version ({version!r}); convert again")
    if version > FORMAT_VERSION:
        raise ApproxError(
            f"{path} has format version {version}, newer than this approxctl reads "
            f"({FORMAT_VERSION}); upgrade approxctl"
        )
    _check_meta(meta, path)
    return meta


# approx.json entries load() reads: key -> (accepted types, required)
_META_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "target": ((str,), True),
    "options": ((dict,), True),
    "exclude": ((list,), False),
    "type_overrides": ((dict, type(None)), False),
    "layer_overrides": ((dict, type(None)), False),
    "source": ((dict, type(None)), False),
}
# The only constructor arguments approxctl stores for a source (derived from the data).
SOURCE_KWARGS = ("num_classes", "in_channels", "image_size")


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """approx.json has the entries and types ``load`` needs (a damaged or edited file does not)."""
    for key, (types, required) in _META_FIELDS.items():
        if key not in meta:
            if required:
                raise ApproxError(f"{path} lacks the entry '{key}'; it is damaged: convert again")
            continue
        if not isinstance(meta[key], types):
            raise ApproxError(
                f"{path}: '{key}' is a {type(meta[key]).__name__}, not a "
                f"{' or '.join(t.__name__ for t in types)}; it is damaged: convert again"
            )
    source = meta.get("source")
    if source is not None and not (
        isinstance(source.get("kind"), str)
        and isinstance(source.get("name"), str)
        and isinstance(source.get("kwargs", {}), dict)
    ):
        raise ApproxError(f"{path}: the 'source' entry is malformed; convert again")


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
    try:
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
    except ApproxError as exc:
        raise ApproxError(f"{directory / META_FILE}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # options a damaged file cannot express
        raise ApproxError(
            f"{directory / META_FILE}: its target options cannot be read "
            f"({type(exc).__name__}: {exc}); it is damaged: convert again"
        ) from None
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
        if not trust_pickle:
            _check_stored_source(directory / META_FILE, source)
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


def _check_stored_source(path: Path, source: SourceInfo) -> None:
    """approx.json is data, not code: refuse what approxctl never writes and could run code.

    Rebuilding calls the stored architecture with the stored arguments. A saved directory may
    name an ``nn.Module`` class (built-in, torchvision or ``package.module:Class``, whose module
    is imported as ``import`` would) with the data-derived arguments approxctl stores; anything
    else (``subprocess:getoutput`` with a ``cmd`` argument, say) needs ``trust_pickle``.
    """
    hint = (
        "approxctl never writes that, so the file was edited; pass the float model "
        "(approxctl.load(dir, model=...)) or --trust-pickle if you trust the directory"
    )
    extra = [
        k
        for k, v in source.kwargs.items()
        if k not in SOURCE_KWARGS or not isinstance(v, int) or isinstance(v, bool)
    ]
    if extra:
        raise ApproxError(
            f"{path}: the source has constructor arguments {', '.join(map(repr, extra))} that "
            f"are not integer {', '.join(SOURCE_KWARGS)}; {hint}"
        )
    if source.kind == "import":
        factory = import_object(source.name)
        if not (inspect.isclass(factory) and issubclass(factory, nn.Module)):
            raise ApproxError(
                f"{path}: the source '{source.name}' is not an nn.Module class and loading "
                f"would call it; {hint}"
            )
