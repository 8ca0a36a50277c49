"""Bad input through the command line (SPEC section 1): one clear line on stderr saying what is
wrong and what to do, exit status 2, no traceback, and nothing half-written in ``--out``.

Cases already covered elsewhere, not repeated here: unknown target / wrong-shape LUT / missing
dataset folder / bad --sc-phase and --sc-length (tests/test_cli.py), unreadable weights and
state dicts at the API level (tests/test_sources.py), IDX/CIFAR readers (tests/test_data.py),
broken ONNX files at the API level (tests/test_onnx.py), recipe typos at the API level
(tests/test_recipes.py), newer approx.json at the API level (tests/test_io.py). Every case here
goes through the CLI (in-process, typer's CliRunner) and checks the whole contract.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import approxctl
from approxctl.cli import app
from approxctl.models import TinyConv

runner = CliRunner()
QUICK = ["--data", "digits", "--calib-batches", "1", "--error-batches", "1", "--batch-size", "64"]


def _cli(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result: object, *fragments: str) -> str:
    """Exit status 2, exactly one stderr line starting 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyConv converted for approx-mult on 1x8x8 digits."""
    out = tmp_path_factory.mktemp("converted") / "digits-am"
    result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy_of(tmp_path: Path, digits_model: Path):  # type: ignore[no-untyped-def]
    """A private copy of the converted directory, for tests that damage it."""

    def make() -> Path:
        target = tmp_path / "copy"
        target.mkdir()
        for item in digits_model.iterdir():
            if item.is_file():
                (target / item.name).write_bytes(item.read_bytes())
        return target

    return make


# ------------------------------------------------------------------ weights files
def _weights(tmp_path: Path, kind: str) -> Path:
    state = TinyConv(1, 10, 8).state_dict()
    good_pt, good_st = tmp_path / "good.pt", tmp_path / "good.safetensors"
    torch.save(state, good_pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(good_st))
    path = tmp_path / kind
    data = {
        "empty.pth": b"",
        "truncated.pth": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "corrupt.pth": bytes(range(256)) * 8,
        "empty.safetensors": b"",
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "corrupt.safetensors": b"\xff" * 64 + bytes(range(256)),
    }.get(kind)
    if data is not None:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing.pth", "does not exist"),
        ("empty.pth", "is empty"),
        ("truncated.pth", "truncated or corrupt"),
        ("corrupt.pth", "truncated or corrupt"),
        ("missing.safetensors", "does not exist"),
        ("empty.safetensors", "is empty"),
        ("truncated.safetensors", "truncated or corrupt"),
        ("corrupt.safetensors", "truncated or corrupt"),
    ],
)
def test_unreadable_weights(tmp_path: Path, kind: str, message: str) -> None:
    path = _weights(tmp_path, kind)
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--weights", path, "--out", out)
    assert_one_line_error(result, message, kind)
    assert_nothing_written(out)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "corrupt"])
def test_unreadable_onnx_source(tmp_path: Path, kind: str) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnx2torch")
    from onnx import TensorProto, helper

    path = tmp_path / f"{kind}.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    good = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = good.SerializeToString()
    if kind != "missing":
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                          "corrupt": b"\x12\x34not protobuf" * 9}[kind])  # fmt: skip
    assert onnx is not None
    out = tmp_path / "out"
    result = _cli("convert", path, "--target", "am", *QUICK, "--out", out)
    assert_one_line_error(result, f"{kind}.onnx")
    assert_nothing_written(out)


def test_state_dict_not_fitting_names_missing_unexpected_and_misshaped_keys(
    tmp_path: Path,
) -> None:
    state = dict(TinyConv(1, 10, 8).state_dict())
    del state["features.0.1.weight"]
    state["head.extra"] = torch.zeros(3)
    state["features.1.0.weight"] = torch.zeros(32, 16, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "sc", *QUICK, "--weights",
                  tmp_path / "bad.pt", "--out", out)  # fmt: skip
    assert_one_line_error(
        result,
        "missing: features.0.1.weight",
        "unexpected: head.extra",
        "mis-shaped: features.1.0.weight (file (32, 16, 5, 5), model (32, 32, 5, 5))",
    )
    assert_nothing_written(out)


# ------------------------------------------------------------------ targets, options, recipes
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["convert", "tinyconv", "--target", "analog", "--adc-bits", "0"], ["adc_bits", "0"]),
        (["convert", "tinyconv", "--target", "analog", "--adc-calib", "best"], ["adc_calib"]),
        (["convert", "tinyconv", "--target", "sc", "--sc-gain", "-1"], ["gain must be positive"]),
        (["convert", "tinyconv", "--target", "am", "--poly-degree", "99"], ["poly_degree"]),
        (["convert", "tinyconv", "--target", "am", "--backend", "gpu9"], ["unknown backend"]),
        (["convert", "tinyconv", "--target", "am", "--device", "tpu"], ["unknown device 'tpu'"]),
        (["convert", "tinyconv", "--target", "am", "--exclude", "*"], ["all excluded by"]),
        (["convert", "tinyconv", "--target", "am", "--mean", "a,b"], ["--mean"]),
        (["convert", "tinyconv", "--target", "am", "--calib-batches", "0"], ["--calib-batches"]),
        # values typer itself cannot parse, and missing/unknown options: still one line
        (["convert", "tinyconv", "--target", "am", "--batch-size", "many"],
         ["'--batch-size'", "--help"]),
        (["convert", "tinyconv"], ["Missing option '--target'", "--help"]),
        (["convert", "tinyconv", "--target", "am", "--colour"], ["--colour"]),
        (["eval", "tinyconv", "--target", "am", "--mode", "approximate"], ["unknown mode"]),
        (["train", "--target", "am", "--lr", "-1"], ["--lr must be positive"]),
        (["train", "--target", "am", "--optimizer", "rmsprop"], ["--optimizer"]),
        (["train", "--target", "am", "--finetune", "-1"], ["must not be negative"]),
        (["train", "--target", "am", "--lut", "mul9u_nope"], ["unknown multiplier 'mul9u_nope'"]),
        (["train", "--target", "sc", "--noise-scale", "-0.5"], ["noise_scale", "[0, 10]"]),
        (["convert", "tinyconv", "--target", "am", "--noise-scale", "nan"], ["noise_scale"]),
        (["train", "--target", "am", "--bn-recalib", "-1"], ["--bn-recalib must not be negative"]),
        (["eval", "tinyconv", "--target", "am", "--bn-recalib", "-2"], ["--bn-recalib", "-2"]),
    ],
)  # fmt: skip
def test_bad_option_values(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    out = tmp_path / "out"
    assert_one_line_error(_cli(*args, "--data", "digits", "--out", out), *fragments)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("epoch = 3\n", ["unknown recipe key(s) epoch"]),
        ('lr = "fast"\n', ["lr = 'fast' should be a number"]),
        ('epochs = "three"\n', ["epochs = 'three' should be an integer"]),
        ("exclude = 3\n", ["exclude = 3 should be a list of strings"]),
        ('amp = "yes"\n', ["amp = 'yes' should be true or false"]),
        ("options = 3\n", ["[options] must be a table"]),  # brackets survive rich markup
        ("[options]\nlenght = 64\n", ["unknown option(s) lenght"]),
        ("epochs = \n", ["not valid TOML"]),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, fragments: list[str]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    out = tmp_path / "out"
    result = _cli("train", "--target", "sc", "--data", "digits", "--recipe", recipe, "--out", out)
    assert_one_line_error(result, str(recipe) if "lenght" not in text else "", *fragments)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("table", "fragments"),
    [
        (np.zeros((128, 128), np.float32), ["integer numpy array", "float32"]),
        (np.zeros((128, 128, 2), np.int32), ["shape (128, 128) or (256, 256)"]),
        (-np.ones((128, 128), np.int32), ["negative entry"]),
        (np.full((128, 128), 2**40, np.int64), ["far beyond the product range"]),
        (np.array([{"a": 1}], dtype=object), ["not a readable .npy array"]),
        ("truncated", ["not a readable .npy array"]),
    ],
)
def test_bad_lut_files(tmp_path: Path, table: object, fragments: list[str]) -> None:
    path = tmp_path / "table.npy"
    if isinstance(table, str):
        np.save(path, np.zeros((128, 128), np.int32))
        path.write_bytes(path.read_bytes()[:300])
    else:
        np.save(path, table, allow_pickle=True)
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--lut", path, "--out", out)
    assert_one_line_error(result, str(path), *fragments)
    assert_nothing_written(out)


# ------------------------------------------------------------------ datasets
def _write_idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _mnist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    _write_idx(folder / "train-images-idx3-ubyte", np.zeros((32, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte", np.arange(32) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((8, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(8) % 10)
    return folder


def _cifar(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((n, 3072), np.uint8), "labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("idx-truncated", ["train-images-idx3-ubyte is truncated", "download it again"]),
        ("idx-magic", ["is not an IDX file (bad magic number"]),
        ("idx-gzip", ["damaged gzip file"]),
        ("cifar-truncated", ["data_batch_2 is not a readable CIFAR-10 batch"]),
        ("cifar-shape", ["data_batch_2: expected 'data' of shape (N, 3072)"]),
        ("cifar-missing", ["lacks test_batch"]),
    ],
)
def test_malformed_datasets(tmp_path: Path, damage: str, fragments: list[str]) -> None:
    if damage.startswith("idx"):
        folder = _mnist(tmp_path / "mnist")
        spec = f"mnist:{folder}"
        images = folder / "train-images-idx3-ubyte"
        if damage == "idx-truncated":
            images.write_bytes(images.read_bytes()[:1000])
        elif damage == "idx-magic":
            images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
        else:
            (folder / "train-labels-idx1-ubyte").unlink()
            (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    else:
        folder = _cifar(tmp_path / "cifar-10-batches-py")
        spec = f"cifar10:{folder}"
        batch = folder / "data_batch_2"
        if damage == "cifar-truncated":
            batch.write_bytes(batch.read_bytes()[:200])
        elif damage == "cifar-shape":
            bad = {"data": np.zeros((4, 3000), np.uint8), "labels": [0, 1, 2, 3]}
            batch.write_bytes(pickle.dumps(bad, protocol=2))
        else:
            (folder / "test_batch").unlink()
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "am", "--data", spec, "--out", out)
    assert_one_line_error(result, *fragments)
    assert_nothing_written(out)


# ------------------------------------------------------------------ images that do not fit
@pytest.mark.parametrize("command", ["eval", "train", "profile"])
def test_one_channel_model_on_three_channel_data(
    tmp_path: Path, digits_model: Path, command: str
) -> None:
    data = _cifar(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out"
    args = {
        "eval": ["eval", digits_model, "--out", out],
        "train": ["train", digits_model, "--target", "am", "--out", out],
        "profile": ["profile", digits_model, "--batch-size", "4", "--iters", "1"],
    }[command]
    result = _cli(*args, "--data", f"cifar10:{data}", "--quiet")
    assert_one_line_error(
        result, "does not accept 3x32x32 images from cifar10", "converted for 1-channel images"
    )
    assert_nothing_written(out)


def test_model_on_images_of_another_size(tmp_path: Path, digits_model: Path) -> None:
    data = _mnist(tmp_path / "mnist")  # 28x28, padded to 32x32 by default
    result = _cli("eval", digits_model, "--data", f"mnist:{data}", "--quiet")
    assert_one_line_error(result, "does not accept 1x32x32", "add --image-size 8")
    # and the fix it proposes works
    fixed = _cli("eval", digits_model, "--data", f"mnist:{data}", "--image-size", "8", "--json")
    assert fixed.exit_code == 0, fixed.output


def test_profile_classes_that_do_not_match(digits_model: Path) -> None:
    result = _cli("profile", digits_model, "--input-shape", "1,8,8", "--num-classes", "5",
                  "--batch-size", "4", "--iters", "1", "--quiet")  # fmt: skip
    assert_one_line_error(result, "outputs shape (10,)", "have 5 classes")


# ------------------------------------------------------------------ layers that cannot convert
NETS = """
from torch import nn


class OnlyConv1d(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.temporal = nn.Conv1d(8, num_classes, 8)

    def forward(self, x):
        return self.temporal(x.flatten(1, 2)).flatten(1)


class Conv1dThenLinear(OnlyConv1d):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.head = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        return self.head(super().forward(x))
"""


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "approxctl_bad_input_nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "approxctl_bad_input_nets"


def test_layers_that_cannot_be_converted_are_named(tmp_path: Path, nets: str) -> None:
    out = tmp_path / "out"
    result = _cli("convert", f"{nets}:OnlyConv1d", "--target", "am", *QUICK, "--out", out)
    assert_one_line_error(
        result, "no Conv2d or Linear layer was converted", "temporal: Conv1d is not a supported"
    )
    assert_nothing_written(out)
    # Some layers convert: the others are named in a warning, and in the JSON document.
    mixed = _cli("convert", f"{nets}:Conv1dThenLinear", "--target", "am", *QUICK,
                 "--out", out, "--quiet")  # fmt: skip
    assert mixed.exit_code == 0, mixed.output
    assert "not converted: temporal: Conv1d is not a supported layer type" in mixed.stderr
    doc = _cli("convert", f"{nets}:Conv1dThenLinear", "--target", "am", *QUICK, "--json")
    assert json.loads(doc.stdout)["unsupported"] == {
        "temporal": "Conv1d is not a supported layer type (only Conv2d and Linear)"
    }


# ------------------------------------------------------------------ the output directory
def test_out_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--out", out)
        assert_one_line_error(result, "is a file, not a folder", "choose another --out")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_out_that_is_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--out", locked / "m")
        assert_one_line_error(result, "not writable", "choose another --out")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_permission_denied_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a non-root user sees when the folder refuses a file (simulated, so it runs as root
    too: the temporary file cannot be created)."""
    from approxctl import io

    def refuse(*args: object, dir: str, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--out", out)
    assert_one_line_error(result, "permission denied", str(out), "choose another --out")
    assert_nothing_written(out)


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, n: int) -> None:
    """Make ``module.name`` (a function writing a file) fail like a full disk on its n-th call:
    half the bytes land in the temporary file, then OSError(ENOSPC)."""
    original = getattr(module, name)
    calls = []

    def writer(obj: object, path: object, *args: object, **kwargs: object) -> object:
        calls.append(path)
        if len(calls) < n:
            return original(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, writer)


def test_full_disk_during_convert_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    _fill_disk_after(monkeypatch, safetensors.torch, "save_file", 1)
    out = tmp_path / "out"
    result = _cli("convert", "tinyconv", "--target", "am", *QUICK, "--out", out)
    assert_one_line_error(
        result, "no space left on the device", f"{out}/model.safetensors", "free space"
    )
    assert not out.exists()  # the folder this save created is gone with its temporaries


def test_full_disk_keeps_the_previous_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_model: Path, copy_of
) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    out = copy_of()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fill_disk_after(monkeypatch, safetensors.torch, "save_file", 1)
    result = _cli("convert", "tinyconv", "--target", "sc", *QUICK, "--out", out)
    assert_one_line_error(result, "no space left on the device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # still the am model
    assert approxctl.load(out).approx_plan.target == "approx-mult"


def test_full_disk_while_training_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second checkpoint (after the first epoch) cannot be written: the run stops with one
    line, the first checkpoint stays readable and no temporary is left."""
    _fill_disk_after(monkeypatch, torch, "save", 2)
    out = tmp_path / "run"
    result = _cli("train", "tinyconv", "--target", "am", "--data", "digits", "--limit-train",
                  "128", "--limit-val", "64", "--batch-size", "64", "--pretrain", "0",
                  "--epochs", "1", "--finetune", "0", "--out", out, "--quiet")  # fmt: skip
    assert_one_line_error(result, "no space left on the device", "checkpoints/last.pt")
    monkeypatch.undo()
    payload = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert payload["state"]["history"] == []  # the starting point, intact
    assert not _temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


# ------------------------------------------------------------------ converted directories
def test_newer_format_version(copy_of) -> None:  # type: ignore[no-untyped-def]
    directory = copy_of()
    meta = json.loads((directory / "approx.json").read_text())
    (directory / "approx.json").write_text(json.dumps(meta | {"format_version": 2}))
    result = _cli("eval", directory, "--data", "digits", "--quiet")
    assert_one_line_error(result, "format version 2, newer than this approxctl reads (1)",
                          "upgrade approxctl")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"options": None}, ["'options' is a NoneType, not a dict", "convert again"]),
        ({"target": "quantum"}, ["approx.json: unknown target 'quantum'"]),
        ({"format_version": "1"}, ["no valid format_version"]),
        ({"format": "other"}, ["was not written by approxctl"]),
    ],
)
def test_damaged_approx_json(copy_of, change: dict, fragments: list[str]) -> None:  # type: ignore[no-untyped-def]
    directory = copy_of()
    meta = json.loads((directory / "approx.json").read_text())
    (directory / "approx.json").write_text(json.dumps(meta | change))
    assert_one_line_error(_cli("eval", directory, "--data", "digits", "--quiet"), *fragments)


def test_damaged_model_file(copy_of) -> None:  # type: ignore[no-untyped-def]
    directory = copy_of()
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    result = _cli("eval", directory, "--data", "digits", "--quiet")
    assert_one_line_error(result, "model.safetensors: not a readable safetensors file")


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ({"kind": "import", "name": "subprocess:getoutput", "kwargs": {"cmd": "touch {m}"}},
         ["constructor arguments 'cmd'", "--trust-pickle"]),
        ({"kind": "import", "name": "subprocess:getoutput", "kwargs": {}},
         ["'subprocess:getoutput' is not an nn.Module class"]),
        ({"kind": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}},
         ["constructor arguments 'weights'"]),
    ],
)  # fmt: skip
def test_approx_json_cannot_make_loading_run_code(
    tmp_path: Path, copy_of, source: dict, fragments: list[str]
) -> None:  # type: ignore[no-untyped-def]
    """approx.json is data: loading a directory calls only nn.Module classes, with the
    data-derived integer arguments approxctl itself stores."""
    directory = copy_of()
    marker = tmp_path / "pwned"
    source = json.loads(json.dumps(source).replace("{m}", str(marker)))
    meta = json.loads((directory / "approx.json").read_text())
    (directory / "approx.json").write_text(json.dumps(meta | {"source": source}))
    assert_one_line_error(_cli("eval", directory, "--data", "digits", "--quiet"), *fragments)
    assert not marker.exists()


def test_a_three_channel_model_on_one_channel_data_names_the_channels() -> None:
    result = _cli("eval", "resnet18", "--data", "digits", "--limit-val", "16", "--quiet")
    assert_one_line_error(result, "takes 3-channel images but the data has 1")
