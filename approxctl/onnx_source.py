"""ONNX files -> torch modules with onnx2torch (the ``onnx`` extra).

What converts: graphs from ``torch.onnx.export(..., dynamo=False)`` at opsets 13 and 17 (the
TorchScript exporter). What often does not: the dynamo exporter's opset-18 graphs, whose opset-18
versions of ReduceMean, Split, Pad, Resize, ... onnx2torch has no converter for. Every node is
checked against onnx2torch's converter registry before conversion, so the error names all the
unsupported ops at once.

External tensor data is read only from files inside the model's folder (a ``location`` such as
``../secret`` or ``/etc/passwd`` is refused). ``save_copy`` writes a self-contained copy of a
graph (external data inlined), which ``approxctl.io.save`` keeps next to a converted model so the
directory reloads without the original file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from approxctl.errors import ApproxError

EXPORT_HINT = (
    "graphs from torch.onnx.export(model, x, path, dynamo=False, opset_version=17) (or 13) "
    "convert; the dynamo exporter's opset-18 graphs often do not, so re-export with "
    "dynamo=False"
)
# protobuf cannot serialize one message over 2 GiB; bigger copies keep their tensors beside them.
_PROTOBUF_LIMIT = 2**31 - 1


def _onnx() -> Any:
    try:
        import onnx
        import onnx2torch  # noqa: F401  (checked here so the error names the extra)
    except ImportError:
        raise ApproxError(
            "reading ONNX needs the onnx extra: pip install 'approxctl[onnx]'"
        ) from None
    return onnx


def read_onnx(path: str | Path) -> Any:
    """The ``onnx.ModelProto`` in ``path``, with its external tensor data loaded (checked)."""
    path = Path(path)
    model = _parse(path)
    load_external_data_safely(model, path.parent)
    return model


def _parse(path: Path) -> Any:
    """The graph in ``path`` without its external data, after checks that it is an ONNX model."""
    onnx = _onnx()
    if not path.is_file():
        raise ApproxError(f"ONNX file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ApproxError(f"ONNX file '{path}' is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ApproxError(
            f"{path}: not a readable ONNX model, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None
    # Protobuf parses many byte strings into a mostly empty message; a model has a graph.
    if model.ir_version < 1 or not model.opset_import or not model.graph.node:
        raise ApproxError(f"{path}: not an ONNX model (no graph nodes or opset); is it corrupt?")
    return model


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external_tensors(model: Any) -> list[Any]:
    onnx = _onnx()
    return [t for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]


def load_external_data_safely(model: Any, folder: Path) -> None:
    """Load external tensor data, refusing locations that escape the model's folder."""
    from onnx.external_data_helper import load_external_data_for_model

    tensors = _external_tensors(model)
    if not tensors:
        return
    root = folder.resolve()
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()  # follows symlinks, so a link out is refused too
        if not location or root not in target.parents:
            raise ApproxError(
                f"ONNX tensor '{tensor.name}' points at external data '{location}', outside the "
                f"model's folder {root}; refusing to read it (keep the data files next to the "
                ".onnx file)"
            )
        if not target.is_file():
            raise ApproxError(
                f"ONNX tensor '{tensor.name}': external data file '{target}' is missing"
            )
    try:
        load_external_data_for_model(model, str(root))
    except Exception as exc:  # short files, bad offsets
        raise ApproxError(
            f"ONNX external data in {root} could not be read ({type(exc).__name__}: {exc})"
        ) from None


def _fold_identity_initializers(model: Any) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    torch's TorchScript exporter deduplicates equal initializers (e.g. two all-zero conv biases)
    and reaches the duplicates through Identity nodes; onnx2torch needs conv/linear weights to be
    initializers, so it fails on such graphs with a bare KeyError.
    """
    onnx = _onnx()
    initializers = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}  # a graph output must stay a node output
    kept = []
    for node in model.graph.node:
        if (
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and node.output[0] not in outputs
        ):
            source = initializers.get(node.input[0]) if node.input else None
            if source is not None:
                copy = onnx.TensorProto()
                copy.CopyFrom(source)
                copy.name = node.output[0]
                model.graph.initializer.append(copy)
                initializers[copy.name] = copy
                continue
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def unsupported_ops(model: Any) -> list[str]:
    """``"Op (opset N)"`` for every op type in the graph that onnx2torch has no converter for."""
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    if "ai.onnx" in opsets:
        opsets.setdefault("", opsets["ai.onnx"])
    missing: dict[str, int] = {}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = opsets.get(domain)
        name = f"{domain}::{node.op_type}" if domain else node.op_type
        if version is None:
            label = f"{name} (domain '{domain}' not imported)"
        else:
            label = f"{name} (opset {version})"
            try:
                get_converter(operation_type=node.op_type, version=version, domain=domain)
                continue
            except NotImplementedError:
                pass
        missing[label] = missing.get(label, 0) + 1
    return [f"{label} x{count}" if count > 1 else label for label, count in missing.items()]


def to_torch(model: Any, origin: str) -> nn.Module:
    """Convert an ``onnx.ModelProto`` with onnx2torch; ``origin`` names it in errors."""
    from onnx2torch import convert as onnx_to_torch

    onnx = _onnx()
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _fold_identity_initializers(work)
    missing = unsupported_ops(work)
    if missing:
        raise ApproxError(
            f"{origin}: onnx2torch cannot convert the ops {', '.join(missing)}; {EXPORT_HINT}"
        )
    try:
        module = onnx_to_torch(work)
    except NotImplementedError as exc:  # a supported op with an unsupported attribute
        raise ApproxError(
            f"{origin}: onnx2torch cannot convert this graph ({exc}); {EXPORT_HINT}"
        ) from None
    except Exception as exc:  # onnx2torch fails in many ways on odd graphs
        raise ApproxError(
            f"{origin}: ONNX conversion failed ({type(exc).__name__}: {exc}); {EXPORT_HINT}"
        ) from None
    return module.eval()


def load_onnx(path: str | Path) -> nn.Module:
    """The float torch module (eval mode) of the ONNX model in ``path``."""
    return to_torch(read_onnx(path), str(path))


def save_copy(source: str | Path, dest: Path, data_name: str) -> None:
    """Write the ONNX model ``source`` to ``dest`` so it needs no file outside ``dest``'s folder.

    A graph without external data is copied byte for byte; otherwise its tensors are inlined, or,
    past protobuf's 2 GiB limit, written to ``data_name`` beside ``dest``.
    """
    source = Path(source)
    onnx = _onnx()
    model = _parse(source)
    if not _external_tensors(model):
        shutil.copyfile(source, dest)
        return
    load_external_data_safely(model, source.parent)
    if model.ByteSize() < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(dest))
    else:
        (dest.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save_model(
            model,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
        )
