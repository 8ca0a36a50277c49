"""Data parallel training (SPEC section 4): DDP with gloo on CPU, through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import approxctl


def _model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    )  # fmt: skip
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    converted = approxctl.convert(model, "am", example_inputs=x)
    approxctl.set_mode(converted, "exact")  # deterministic, so gradients must agree exactly
    return converted, x, y


def _rank_gradients(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, x, y = _model_and_batch()
    ddp = nn.parallel.DistributedDataParallel(model)
    half = slice(rank * 4, rank * 4 + 4)
    F.cross_entropy(ddp(x[half]), y[half]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()


def test_ddp_gradient_equals_the_single_process_gradient(tmp_path: Path) -> None:
    out = str(tmp_path / "grads.pt")
    mp.spawn(_rank_gradients, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    model, x, y = _model_and_batch()
    F.cross_entropy(model(x), y).backward()
    for single, ddp in zip(model.parameters(), torch.load(out), strict=True):
        assert torch.allclose(single.grad, ddp, rtol=1e-5, atol=1e-7)


def test_torchrun_two_processes_train_and_only_rank_0_writes(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "approxctl",
        "train", "tinyconv", "--target", "am", "--data", "digits", "--limit-train", "512",
        "--batch-size", "64", "--pretrain", "0", "--epochs", "1", "--finetune", "0.5",
        "--out", str(tmp_path),
        "--json", "--quiet",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    # A rank's own error comes first; torchrun's summary of the failure fills the tail.
    assert done.returncode == 0, done.stderr[:2500] + "\n...\n" + done.stderr[-1000:]
    doc = json.loads(done.stdout)
    assert [r["phase"] for r in doc["history"]] == ["inject", "finetune"]
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("**/*.tmp"))
