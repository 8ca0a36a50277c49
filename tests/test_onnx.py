"""ONNX SOURCEs: torch's TorchScript exporter (dynamo=False) at opsets 13 and 17 converts and
matches PyTorch; unsupported ops are named; broken files and external data outside the model's
folder are refused; a converted directory keeps a self-contained ``source.onnx`` and reloads
bit-identically after the original file is gone.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import approxctl
from approxctl import ApproxError
from approxctl.models import ResNetTiny, TinyConv
from approxctl.sources import build_model, sha256_file

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
from onnx import TensorProto, helper  # noqa: E402

X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _export(model: nn.Module, path: Path, opset: int = 17) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(
            model.eval(),
            (X,),
            str(path),
            opset_version=opset,
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def _convert(path: Path, x: torch.Tensor = X) -> nn.Module:
    """What ``pipeline.convert_source`` does with an .onnx SOURCE."""
    model, info = build_model(str(path))
    converted = approxctl.convert(model, "am", example_inputs=x)
    converted.approx_source = info
    converted.approx_onnx_path = str(path)
    return converted


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("arch", ["tinyconv", "resnet_tiny"])
def test_legacy_exporter_graphs_convert_and_match(tmp_path: Path, opset: int, arch: str) -> None:
    # Fresh BatchNorms fold into equal (zero) conv biases, which the exporter deduplicates
    # into Identity nodes: the case onnx2torch alone fails on.
    reference = (TinyConv(1, 10, 16) if arch == "tinyconv" else ResNetTiny(1, 10)).eval()
    path = _export(reference, tmp_path / f"{arch}.onnx", opset)
    model, info = build_model(str(path))
    assert (info.kind, info.name) == ("onnx", f"{arch}.onnx")
    assert info.weights_sha256 == sha256_file(path)
    assert not model.training
    with torch.no_grad():
        expected = reference(X)
        torch.testing.assert_close(model(X), expected, rtol=0, atol=1e-5)
        converted = approxctl.convert(model, "am", example_inputs=X)
        convs = 3 if arch == "tinyconv" else 9
        assert len(approxctl.approx_layers(converted)) == convs + 1
        approxctl.set_mode(converted, "float")
        torch.testing.assert_close(converted(X), expected, rtol=0, atol=1e-5)


def test_directory_reloads_bit_identically_without_the_onnx_file(tmp_path: Path) -> None:
    source = _export(TinyConv(1, 10, 16), tmp_path / "src" / "model.onnx")
    converted = _convert(source)
    approxctl.fit_error_model(converted, [X])
    directory = approxctl.save(converted, tmp_path / "out")
    assert sha256_file(directory / "source.onnx") == sha256_file(source)  # a byte copy
    shutil.rmtree(tmp_path / "src")
    loaded = approxctl.load(directory)
    assert loaded.approx_source.kind == "onnx"
    with torch.no_grad():
        for mode in ("float", "exact", "inject"):
            approxctl.set_mode(converted, mode)
            approxctl.set_mode(loaded, mode)
            torch.manual_seed(3)
            expected = converted(X)
            torch.manual_seed(3)
            assert torch.equal(loaded(X), expected), mode
    # A loaded model saves again (its graph comes from the directory's copy).
    again = approxctl.load(approxctl.save(loaded, tmp_path / "again"))
    approxctl.set_mode(again, "exact")
    approxctl.set_mode(converted, "exact")
    with torch.no_grad():
        assert torch.equal(again(X), converted(X))


def test_saving_without_the_graph_writes_nothing(tmp_path: Path) -> None:
    source = _export(TinyConv(1, 10, 16), tmp_path / "model.onnx")
    converted = _convert(source)
    source.unlink()
    with pytest.raises(ApproxError, match="copy of"):
        approxctl.save(converted, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    directory = approxctl.save(_convert(_export(TinyConv(1, 10, 16), source)), tmp_path / "ok")
    (directory / "source.onnx").unlink()
    with pytest.raises(ApproxError, match=r"source\.onnx is missing"):
        approxctl.load(directory)


def test_onnx_source_takes_no_weights(tmp_path: Path) -> None:
    source = _export(TinyConv(1, 10, 16), tmp_path / "model.onnx")
    with pytest.raises(ApproxError, match="holds its own weights"):
        build_model(str(source), weights=str(tmp_path / "w.pt"))


# ------------------------------------------------------------------ unsupported graphs
def _graph(op: str, opset: int, **attrs) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """x (1,1,4,4) -> Conv 3x3 -> ``op`` -> y."""
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [2, 1, 3, 3], np.ones(18, np.float32).tolist()
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(op, ["c"], ["y"], name="odd", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    path = tmp_path / "hardmax.onnx"
    onnx.save(_graph("Hardmax", 17), str(path))
    with pytest.raises(ApproxError) as info:
        build_model(str(path))
    message = str(info.value)
    assert "Hardmax (opset 17)" in message
    assert "dynamo=False" in message


def test_opset18_reduce_mean_is_named_with_the_export_hint(tmp_path: Path) -> None:
    # The dynamo exporter writes opset-18 ops such as ReduceMean-18 (axes as an input).
    path = tmp_path / "dynamo.onnx"
    onnx.save(_graph("ReduceMean", 18, keepdims=1), str(path))
    with pytest.raises(ApproxError, match=r"ReduceMean \(opset 18\).*dynamo=False"):
        build_model(str(path))


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "text"])
def test_unreadable_onnx_files_are_clear_errors(tmp_path: Path, kind: str) -> None:
    good = _export(TinyConv(1, 10, 16), tmp_path / "good.onnx").read_bytes()
    data = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random": os.urandom(777),
        "text": b"definitely not protobuf\n" * 4,
    }[kind]
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(data)
    with pytest.raises(ApproxError, match=r"empty|not a readable ONNX model|not an ONNX model"):
        build_model(str(path))
    with pytest.raises(ApproxError, match="does not exist"):
        build_model(str(tmp_path / "missing.onnx"))


# ------------------------------------------------------------------ external data
def _with_external_data(tmp_path: Path, folder: str) -> tuple[Path, nn.Module]:
    """TinyConv exported with every initializer in ``weights.bin`` beside the graph."""
    reference = TinyConv(1, 10, 16).eval()
    plain = _export(reference, tmp_path / "plain.onnx")
    model = onnx.load(str(plain))
    target = tmp_path / folder / "model.onnx"
    target.parent.mkdir(parents=True)
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    plain.unlink()
    return target, reference


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of ``path`` at ``location`` (without loading the data)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_the_folder_loads_and_is_inlined(tmp_path: Path) -> None:
    path, reference = _with_external_data(tmp_path, "model")
    assert (path.parent / "weights.bin").stat().st_size > 100_000
    converted = _convert(path)
    with torch.no_grad():
        approxctl.set_mode(converted, "float")
        torch.testing.assert_close(converted(X), reference(X), rtol=0, atol=1e-5)
    directory = approxctl.save(converted, tmp_path / "out")
    shutil.rmtree(path.parent)
    copy = onnx.load(str(directory / "source.onnx"), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in copy.graph.initializer)
    assert sorted(p.name for p in directory.iterdir()) == [
        "approx.json",
        "model.safetensors",
        "source.onnx",
    ]
    loaded = approxctl.load(directory)
    approxctl.set_mode(converted, "exact")
    approxctl.set_mode(loaded, "exact")
    with torch.no_grad():
        assert torch.equal(loaded(X), converted(X))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, where: str) -> None:
    path, _ = _with_external_data(tmp_path, "model")
    outside = tmp_path / "outside.bin"
    shutil.move(path.parent / "weights.bin", outside)
    if where == "parent":
        _relocate(path, "../outside.bin")
    elif where == "absolute":
        _relocate(path, str(outside))
    else:  # a link inside the folder that leads out of it
        (path.parent / "weights.bin").symlink_to(outside)
    with pytest.raises(ApproxError, match="outside the model's folder"):
        build_model(str(path))


def test_missing_external_data_is_a_clear_error(tmp_path: Path) -> None:
    path, _ = _with_external_data(tmp_path, "model")
    (path.parent / "weights.bin").unlink()
    with pytest.raises(ApproxError, match=r"external data file .* is missing"):
        build_model(str(path))
