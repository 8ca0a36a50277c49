"""SOURCE kinds of SPEC section 1: built-in, torchvision and import-path architectures with
``--weights`` (.pt/.pth/.safetensors), pickled full modules (only with trust_pickle), and the
clear errors for weights that do not fit or cannot be read. Round trips through
``approxctl.save``/``approxctl.load`` must be bit-identical in exact mode without the source file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import approxctl
from approxctl import ApproxError
from approxctl.models import TinyConv
from approxctl.sources import build_model, classify, read_state_dict, sha256_file

X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _trained_like(model: nn.Module) -> nn.Module:
    """Random (not default-initialized) BatchNorm statistics, so wrong loading would show."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.normal_(1, 0.1, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
    return model.eval()


def _tinyconv(num_classes: int = 10) -> nn.Module:
    return _trained_like(TinyConv(in_channels=1, num_classes=num_classes, image_size=16))


def _round_trip(model: nn.Module, info, tmp_path: Path, x: torch.Tensor, **load_kw) -> None:  # type: ignore[no-untyped-def]
    """convert -> save -> load: exact-mode outputs bit for bit, layer names, source kept."""
    converted = approxctl.convert(model, "am", example_inputs=x)
    converted.approx_source = info
    directory = approxctl.save(converted, tmp_path / "converted")
    loaded = approxctl.load(directory, **load_kw)
    assert classify(str(directory)) == "dir"
    assert loaded.approx_source.to_dict() == info.to_dict()
    with torch.no_grad():
        for mode in ("float", "exact"):
            approxctl.set_mode(converted, mode)
            approxctl.set_mode(loaded, mode)
            assert torch.equal(converted(x), loaded(x)), mode


# ------------------------------------------------------------------ built-in names
def test_builtin_name_builds_and_round_trips(tmp_path: Path) -> None:
    model, info = build_model("tinyconv", num_classes=10, in_channels=1, image_size=16)
    assert info.kind == "builtin"
    assert info.kwargs == {"num_classes": 10, "in_channels": 1, "image_size": 16}
    assert not model.training
    _round_trip(model, info, tmp_path, X)


# ------------------------------------------------------------------ state dicts
def _write(kind: str, state: dict[str, torch.Tensor], path: Path) -> Path:
    if kind == "pt":
        torch.save(state, path.with_suffix(".pt"))
    elif kind == "pth-legacy":  # the pre-1.6 non-zip format
        torch.save(state, path.with_suffix(".pth"), _use_new_zipfile_serialization=False)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path.with_suffix(".safetensors"))
    elif kind == "wrapped":
        torch.save({"state_dict": state, "epoch": 3, "best_acc": 0.9}, path.with_suffix(".pth"))
    elif kind == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path.with_suffix(".pt"))
    else:
        raise AssertionError(kind)
    return next(path.parent.glob(f"{path.name}.*"))


@pytest.mark.parametrize("kind", ["pt", "pth-legacy", "safetensors", "wrapped", "ddp"])
def test_state_dict_files_load_exactly(tmp_path: Path, kind: str) -> None:
    reference = _tinyconv(num_classes=7)
    weights = _write(kind, reference.state_dict(), tmp_path / "weights")
    # No num_classes given: the classifier in the weights says 7.
    model, info = build_model("tinyconv", weights=str(weights), in_channels=1, image_size=16)
    assert info.kwargs["num_classes"] == 7
    assert info.weights == str(weights)
    assert info.weights_sha256 == sha256_file(weights)
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_old_checkpoints_without_batch_counters_load(tmp_path: Path) -> None:
    reference = _tinyconv()
    state = {k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    model, _ = build_model(
        "tinyconv", weights=str(tmp_path / "old.pt"), in_channels=1, image_size=16
    )
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    state = dict(_tinyconv().state_dict())
    del state["features.0.1.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["features.2.0.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ApproxError) as info:
        build_model("tinyconv", weights=str(tmp_path / "bad.pt"), in_channels=1, image_size=16)
    message = str(info.value)
    assert "missing: features.0.1.weight" in message
    assert "unexpected: extra.weight" in message
    assert "mis-shaped: features.2.0.weight (file (64, 32, 3, 3), model (64, 32, 5, 5))" in message


# ------------------------------------------------------------------ torchvision names
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_name_with_weights(tmp_path: Path, suffix: str) -> None:
    import torchvision

    reference = _trained_like(torchvision.models.get_model("resnet18", num_classes=10))
    weights = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(weights))
    else:
        torch.save(reference.state_dict(), weights)
    # in_channels/image_size come from the data; torchvision builders must not receive them.
    model, info = build_model("resnet18", weights=str(weights), in_channels=3, image_size=32)
    assert (info.kind, info.kwargs) == ("torchvision", {"num_classes": 10})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_torchvision_round_trip_is_bit_identical(tmp_path: Path) -> None:
    # MNASNet versions its state dict (``_metadata``), which safetensors does not keep.
    model, info = build_model("mnasnet0_5", num_classes=10, in_channels=3, image_size=16)
    _round_trip(_trained_like(model), info, tmp_path, torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------ import paths
NET_MODULE = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().flatten(1))


def broken():
    return 42
"""


@pytest.fixture
def netmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "approxctl_test_nets.py").write_text(textwrap.dedent(NET_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "approxctl_test_nets"


def test_import_path_with_weights_round_trips(tmp_path: Path, netmod: str) -> None:
    import importlib

    reference = _trained_like(importlib.import_module(netmod).Net(num_classes=5))
    torch.save(reference.state_dict(), tmp_path / "net.pt")
    model, info = build_model(
        f"{netmod}:Net", weights=str(tmp_path / "net.pt"), in_channels=1, image_size=16
    )
    # Net takes num_classes but not in_channels/image_size; the weights say 5 classes.
    assert (info.kind, info.kwargs) == ("import", {"num_classes": 5})
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))
    (tmp_path / "net.pt").unlink()  # the directory must not need the weights file
    _round_trip(model, info, tmp_path, X)


def test_import_path_errors(netmod: str) -> None:
    with pytest.raises(ApproxError, match="cannot import 'no_such_module_xyz'"):
        build_model("no_such_module_xyz:Net")
    with pytest.raises(ApproxError, match="has no attribute 'Nope'"):
        build_model(f"{netmod}:Nope")
    with pytest.raises(ApproxError, match=r"not an nn\.Module"):
        build_model(f"{netmod}:broken")


# ------------------------------------------------------------------ pickles
class _CreatesMarker:
    """What an attacker would pickle: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_full_module_pickle_needs_trust(tmp_path: Path) -> None:
    reference = _tinyconv()
    torch.save(reference, tmp_path / "full.pt")
    with pytest.raises(ApproxError, match=r"pickled Python objects.*TinyConv.*--trust-pickle"):
        build_model("tinyconv", weights=str(tmp_path / "full.pt"), in_channels=1, image_size=16)
    with pytest.raises(ApproxError, match="--trust-pickle"):
        build_model(str(tmp_path / "full.pt"))
    # Trusted, as --weights: the module lends its weights to the named architecture.
    model, info = build_model(
        "tinyconv", weights=str(tmp_path / "full.pt"), trust_pickle=True, in_channels=1,
        image_size=16,
    )  # fmt: skip
    assert info.kind == "builtin"
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_trusted_pickle_source_round_trips_only_with_trust(tmp_path: Path) -> None:
    reference = _tinyconv()
    torch.save(reference, tmp_path / "full.pt")
    model, info = build_model(str(tmp_path / "full.pt"), trust_pickle=True)
    assert info.kind == "pickle"
    assert info.name == "approxctl.models.TinyConv"
    converted = approxctl.convert(model, "am", example_inputs=X)
    converted.approx_source = info
    directory = approxctl.save(converted, tmp_path / "converted")
    (tmp_path / "full.pt").unlink()
    assert (directory / "source.pt").is_file()
    with pytest.raises(ApproxError, match="trust"):
        approxctl.load(directory)
    loaded = approxctl.load(directory, trust_pickle=True)
    approxctl.set_mode(converted, "exact")
    approxctl.set_mode(loaded, "exact")
    with torch.no_grad():
        assert torch.equal(converted(X), loaded(X))
    # A swapped-in pickle is not unpickled even when trusted.
    torch.save(_tinyconv(), directory / "source.pt")
    with pytest.raises(ApproxError, match="SHA-256"):
        approxctl.load(directory, trust_pickle=True)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "in-state-dict"])
def test_malicious_pickle_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    payload = _CreatesMarker(marker)
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save(payload, path)
    elif how == "pickle.dump":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save({"conv.weight": torch.zeros(1), "conv.bias": payload}, path)
    with pytest.raises(ApproxError, match="pickled Python objects") as info:
        build_model("tinyconv", weights=str(path))
    assert "io.open" in str(info.value)
    with pytest.raises(ApproxError):
        build_model(str(path))
    with pytest.raises(ApproxError):
        read_state_dict(path)
    assert not marker.exists()
    # The payload is live: trusting the file runs it (which is why trust is opt-in).
    with contextlib.suppress(ApproxError):
        read_state_dict(path, trust_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------ unreadable files
def _corrupt(kind: str, tmp_path: Path) -> Path:
    good_pt = tmp_path / "good.pt"
    torch.save(_tinyconv().state_dict(), good_pt)
    good_st = tmp_path / "good.safetensors"
    save_file(_tinyconv().state_dict(), str(good_st))
    target = tmp_path / f"bad-{kind}"
    data = {
        "empty.pt": b"",
        "truncated.pt": good_pt.read_bytes()[: good_pt.stat().st_size // 2],
        "random.pth": os.urandom(512),
        "text.pth": b"this is not a checkpoint\n",
        "empty.safetensors": b"",
        "truncated.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "random.safetensors": os.urandom(512),
    }[kind]
    target = target.with_name(kind)
    target.write_bytes(data)
    return target


@pytest.mark.parametrize(
    "kind",
    [
        "empty.pt",
        "truncated.pt",
        "random.pth",
        "text.pth",
        "empty.safetensors",
        "truncated.safetensors",
        "random.safetensors",
    ],
)
def test_unreadable_weights_are_clear_errors(tmp_path: Path, kind: str) -> None:
    path = _corrupt(kind, tmp_path)
    for trust in (False, True):  # never mistaken for a pickle that --trust-pickle would open
        with pytest.raises(ApproxError, match=r"empty|truncated or corrupt") as info:
            build_model("tinyconv", weights=str(path), trust_pickle=trust)
        assert "pickled" not in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ApproxError, match="does not hold a state dict"):
        build_model("tinyconv", weights=str(tmp_path / "list.pt"))
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(ApproxError, match="TorchScript"):
        build_model("tinyconv", weights=str(tmp_path / "scripted.pt"))
    with pytest.raises(ApproxError, match="does not exist"):
        build_model("tinyconv", weights=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------ SOURCE strings
def test_source_strings_are_classified(tmp_path: Path) -> None:
    torch.save(_tinyconv().state_dict(), tmp_path / "sd.pt")
    assert classify("tinyconv") == "builtin"
    assert classify("resnet18") == "torchvision"
    assert classify("pkg.mod:Net") == "import"
    assert classify(str(tmp_path / "m.onnx")) == "onnx"
    assert classify(str(tmp_path)) == "dir"
    assert classify(str(tmp_path / "sd.pt")) == "pickle"
    with pytest.raises(ApproxError, match=r"holds a state dict.*--weights"):
        build_model(str(tmp_path / "sd.pt"))
    with pytest.raises(ApproxError, match="--weights"):
        classify(str(tmp_path / "w.safetensors"))
    with pytest.raises(ApproxError, match="unknown SOURCE 'resnet_huge'"):
        classify("resnet_huge")
    with pytest.raises(ApproxError, match="converted directory"):
        build_model(str(tmp_path))
    with pytest.raises(ApproxError, match=r"cannot construct tinyconv\(image_size=12\)"):
        build_model("tinyconv", image_size=12)
