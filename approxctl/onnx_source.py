"""ONNX files -> torch modules with onnx2torch (the ``onnx`` extra)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from approxctl.errors import ApproxError


def load_onnx(path: Path) -> nn.Module:
    if not path.is_file():
        raise ApproxError(f"ONNX file '{path}' does not exist")
    try:
        import onnx
        from onnx2torch import convert as onnx_to_torch
    except ImportError:
        raise ApproxError(
            "reading ONNX needs the onnx extra: pip install 'approxctl[onnx]'"
        ) from None
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise ApproxError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    _load_external_data_safely(graph, path.parent)
    try:
        model = onnx_to_torch(graph)
    except NotImplementedError as exc:
        raise ApproxError(
            f"{path}: onnx2torch cannot convert this graph ({exc}). Graphs from torch.onnx.export "
            "with dynamo=False at opset 13 or 17 convert; the dynamo exporter's opset-18 graphs "
            "often do not"
        ) from None
    except Exception as exc:  # onnx2torch fails in many ways on odd graphs
        raise ApproxError(f"{path}: conversion failed ({type(exc).__name__}: {exc})") from None
    return model.eval()


def _load_external_data_safely(graph: object, folder: Path) -> None:
    """Load external tensor data, refusing locations that escape the model's folder."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    root = folder.resolve()
    for tensor in graph.graph.initializer:  # type: ignore[attr-defined]
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if root not in target.parents:
            raise ApproxError(
                f"ONNX tensor '{tensor.name}' points at '{location}', outside the model's folder; "
                "refusing to read it"
            )
        if not target.is_file():
            raise ApproxError(f"ONNX external data file '{target}' is missing")
    del onnx
    load_external_data_for_model(graph, str(root))
