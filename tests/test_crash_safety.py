"""Crash safety (SPEC section 5, docs/guarantees.md): every file is written atomically, a kill or
Ctrl-C never leaves a corrupt file, a diverging run stops with the last good checkpoint, and a
run killed at random moments and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import approxctl
from approxctl import io
from approxctl.cli import app

runner = CliRunner()
PACKAGE = Path(approxctl.__file__).parent
QUICK_TRAIN = ["train", "tinyconv", "--target", "am", "--data", "digits", "--limit-train", "128",
               "--limit-val", "64", "--batch-size", "64", "--pretrain", "0", "--quiet"]  # fmt: skip


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


# ------------------------------------------------------------------ every write is atomic
# Calls that write a file, by the name called; open() counts when its mode writes.
_WRITERS = {"save", "save_file", "savefig", "write_text", "write_bytes", "copyfile", "copy2",
            "save_model", "savez", "tofile", "dump"}  # fmt: skip
# Functions whose whole job is to write the temporary file they are given by io.stage.
_STAGE_WRITERS = {("onnx_source.py", "save_copy")}


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Attribute):
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "io":
            return None  # approxctl.io.save: the atomic saver itself
        return node.func.attr
    return node.func.id if isinstance(node.func, ast.Name) else None


def _writes(node: ast.Call) -> bool:
    name = _call_name(node)
    if name in ("open", "fdopen"):
        mode = node.args[1] if len(node.args) > 1 else None
        mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
        return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
    return name in _WRITERS


def test_every_file_write_goes_through_the_atomic_helper() -> None:
    """Statically: a call that writes a file sits in a lambda handed to io.atomic_write /
    io.atomic_write_all (which stage it as a temporary and rename it), or in a function that
    only ever writes such a temporary."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _writes(node)):
                continue
            chain, current = [], node
            while current in parents:
                current = parents[current]
                chain.append(current)
            if any(isinstance(c, ast.Lambda) for c in chain):
                continue
            function = next((c.name for c in chain if isinstance(c, ast.FunctionDef)), None)
            if (path.name, function) in _STAGE_WRITERS:
                continue
            offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ({_call_name(node)})")
    assert offenders == []


def test_stage_writers_are_only_called_through_the_atomic_helper() -> None:
    source = (PACKAGE / "io.py").read_text()
    assert "lambda tmp: save_copy(source_file, tmp" in source
    assert source.count("save_copy(") == 1


# ------------------------------------------------------------------ atomic_write itself
@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), RuntimeError("bug")],
)
def test_a_failed_write_keeps_the_old_file(tmp_path: Path, failure: BaseException) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"old checkpoint")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"new bytes, but only ha")
        raise failure

    with pytest.raises(type(failure)) as info:
        io.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old checkpoint"
    assert _temporaries(tmp_path) == []
    if isinstance(failure, OSError):  # named after the file it was writing
        assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC


def test_library_errors_on_a_full_disk_become_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors and torch.save report a full disk in their own words; the free space tells."""

    def fail_like_safetensors(tmp: Path) -> None:
        raise RuntimeError("Error while serializing: I/O error: No space left (os error 28)")

    with pytest.raises(OSError) as info:
        io.atomic_write(tmp_path / "model.safetensors", fail_like_safetensors)
    assert info.value.errno == errno.ENOSPC

    def fail_like_torch_save(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError):  # plenty of space: a real error, passed on unchanged
        io.atomic_write(tmp_path / "last.pt", fail_like_torch_save)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: type("usage", (), {"free": 0})())
    with pytest.raises(OSError) as info:
        io.atomic_write(tmp_path / "last.pt", fail_like_torch_save)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "last.pt")
    assert _temporaries(tmp_path) == []


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        io.atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_a_set_of_files_is_written_all_or_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "model"

    def full_disk(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        io.atomic_write_all(
            [(folder / "model.safetensors", lambda t: t.write_text("w")),
             (folder / "approx.json", full_disk)]
        )  # fmt: skip
    assert not (tmp_path / "new").exists()  # folders it created are removed again
    folder.mkdir(parents=True)
    (folder / "approx.json").write_text("old")
    io.atomic_write_all(
        [(folder / "model.safetensors", lambda t: t.write_text("new weights")),
         (folder / "approx.json", lambda t: t.write_text("new"))]
    )  # fmt: skip
    assert (folder / "approx.json").read_text() == "new"
    assert _temporaries(tmp_path) == []


KILLED_WRITER = """
import sys, time
from pathlib import Path
from approxctl.io import atomic_write

def slowly(tmp):
    with open(tmp, "wb") as fh:
        for i in range(100000):
            fh.write(b"new!" * 4096)
            fh.flush()
            if i == 20:
                print("writing", flush=True)
            time.sleep(0.005)

atomic_write(Path(sys.argv[1]), slowly)
"""


def test_a_kill_during_a_write_never_leaves_a_corrupt_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing last.pt: the old last.pt is intact, the stray temporary
    is what the next run removes."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    path = checkpoints / "last.pt"
    torch.save({"epoch": 1}, path)
    good = path.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    stray = _temporaries(tmp_path)
    assert len(stray) == 1 and stray[0].name.startswith(".last.pt.")
    assert io.remove_stale_temporaries(tmp_path, ("checkpoints",)) == stray
    assert _temporaries(tmp_path) == [] and path.read_bytes() == good


def test_stale_temporaries_are_only_ours(tmp_path: Path) -> None:
    (tmp_path / ".model.safetensors.ab12_xYZ.tmp").write_text("stray")
    (tmp_path / ".notes.tmp").write_text("someone else's")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.abcdefgh.tmp").write_text("not searched")
    assert [p.name for p in io.remove_stale_temporaries(tmp_path)] == [
        ".model.safetensors.ab12_xYZ.tmp"
    ]
    assert (tmp_path / ".notes.tmp").exists() and (tmp_path / "sub" / ".x.abcdefgh.tmp").exists()


# ------------------------------------------------------------------ Ctrl-C and divergence
def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def test_ctrl_c_in_the_middle_of_an_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit status 130 with a hint to --resume; last.pt holds the last completed epoch."""
    from approxctl import train as train_module

    original = train_module.Trainer._step
    steps = []

    def interrupted(self, x, y, where=""):  # type: ignore[no-untyped-def]
        steps.append(where)
        if len(steps) == 3:  # the first step of the second epoch (2 steps per epoch)
            raise KeyboardInterrupt
        return original(self, x, y, where)

    monkeypatch.setattr(train_module.Trainer, "_step", interrupted)
    out = tmp_path / "run"
    result = runner.invoke(app, [*QUICK_TRAIN, "--epochs", "2", "--finetune", "0",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 130, result.output
    assert "--resume" in result.stderr and "Traceback" not in result.output
    assert steps[-1] == "inject epoch 2, step 1/2"
    payload = _checkpoint(out)
    assert [(r["phase"], r["epoch"]) for r in payload["state"]["history"]] == [("inject", 1)]
    assert _temporaries(out) == []
    assert not (out / "model.safetensors").exists()


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as functional

    from approxctl import train as train_module

    class NanOnThirdLoss:
        calls = 0

        def __getattr__(self, name: str) -> object:
            return getattr(functional, name)

        def cross_entropy(self, *args: object, **kwargs: object) -> torch.Tensor:
            NanOnThirdLoss.calls += 1
            loss = functional.cross_entropy(*args, **kwargs)
            return loss * float("nan") if NanOnThirdLoss.calls == 3 else loss

    monkeypatch.setattr(train_module, "F", NanOnThirdLoss())
    out = tmp_path / "run"
    result = runner.invoke(app, [*QUICK_TRAIN, "--epochs", "2", "--finetune", "0.5",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert "the loss became nan in inject epoch 2, step 1/2" in line
    assert "last.pt keeps the state after inject epoch 1" in line and "lower --lr" in line
    payload = _checkpoint(out)
    assert [(r["phase"], r["epoch"]) for r in payload["state"]["history"]] == [("inject", 1)]
    assert all(t.isfinite().all() for t in payload["model"].values() if t.is_floating_point())
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no model, no report


def test_a_huge_learning_rate_diverges_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [*QUICK_TRAIN[:-3], "--pretrain", "1", "--epochs", "1",
                                 "--finetune", "0", "--lr", "1e30", "--quiet",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.stderr and "pretrain epoch 1" in result.stderr
    assert "lower --lr (now 1e+30)" in result.stderr
    assert _checkpoint(out)["state"]["history"] == []  # the starting point


def test_resuming_a_finished_run_rewrites_its_outputs(tmp_path: Path) -> None:
    """The last checkpoint is saved before the outputs: a run killed while writing them (or a
    finished run resumed) must finish from there, with the same weights."""
    out = tmp_path / "run"
    assert runner.invoke(app, [*QUICK_TRAIN, "--epochs", "1", "--finetune", "0.5",
                               "--out", str(out)]).exit_code == 0  # fmt: skip
    before = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    (out / "report.json").unlink()
    result = runner.invoke(app, [*QUICK_TRAIN, "--epochs", "1", "--finetune", "0.5",
                                 "--out", str(out), "--resume"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "report.json").exists()


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    result = runner.invoke(app, [*QUICK_TRAIN, "--out", str(tmp_path / "never"), "--resume"])
    assert result.exit_code == 2
    assert "run the same command without --resume" in result.stderr
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bad" / "checkpoints" / "last.pt")
    result = runner.invoke(app, [*QUICK_TRAIN, "--out", str(tmp_path / "bad"), "--resume"])
    assert result.exit_code == 2
    assert "is not an approxctl training checkpoint" in result.stderr


# ------------------------------------------------------------------ fault injection
FAULT_RUN = ["train", "tinyconv", "--target", "am", "--data", "digits", "--limit-train", "256",
             "--limit-val", "128", "--pretrain", "0", "--epochs", "2", "--finetune", "0.5",
             "--batch-size", "64", "--seed", "0", "--quiet"]  # fmt: skip


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same threads every run
    return subprocess.Popen(
        [sys.executable, "-m", "approxctl", *FAULT_RUN, "--out", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=900)
    return process.returncode, stderr


def _progress(out: Path) -> str:
    path = out / "checkpoints" / "last.pt"
    if not path.exists():
        return "no checkpoint yet"
    history = _checkpoint(out)["state"]["history"]
    return f"{len(history)} epoch(s) checkpointed" + (
        ", outputs written" if (out / "report.json").exists() else ""
    )


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    """SIGKILL a training run 3 times at seeded random moments, resume until it completes:
    model.safetensors must equal an uninterrupted run's tensor for tensor, bit for bit."""
    started = time.perf_counter()
    rc, stderr = _finish(_launch(tmp_path / "full"))
    full_seconds = time.perf_counter() - started
    assert rc == 0, stderr

    out = tmp_path / "killed"
    rng = random.Random(20240607)
    events = []
    for _ in range(3):
        resume = (out / "checkpoints" / "last.pt").exists()
        process = _launch(out, *(["--resume"] if resume else []))
        delay = rng.uniform(0.25, 0.8) * full_seconds
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
        rc, stderr = _finish(process)
        events.append(f"after {delay:.1f}s: rc {rc}, {_progress(out)}")
        assert rc in (0, -signal.SIGKILL), stderr
    for _ in range(3):  # resume until done (one run suffices; bounded in case of trouble)
        resume = (out / "checkpoints" / "last.pt").exists()
        rc, stderr = _finish(_launch(out, *(["--resume"] if resume else [])))
        events.append(f"{'resume' if resume else 'restart'}: rc {rc}, {_progress(out)}")
        if rc == 0:
            break
    assert rc == 0, stderr

    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    reports = [json.loads((d / "report.json").read_text()) for d in (tmp_path / "full", out)]
    accuracy = [{k: v["top1"] for k, v in r["summary"].items() if isinstance(v, dict)}
                for r in reports]  # fmt: skip
    assert accuracy[0] == accuracy[1]
    assert _temporaries(out) == []
    print(f"\nuninterrupted run {full_seconds:.0f} s; top-1 {accuracy[0]}")
    print("killed run: " + "; ".join(events))
