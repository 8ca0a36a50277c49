"""This tree's inject step against an earlier commit's, in one process, with float alongside.

    python benchmarks/versus_commit.py REV [--target analog] [--mode inject] [--rounds 15]
                                       [--model tinyconv] [--batch-size 128]
                                       [--weights FLOAT.safetensors] [--same-training]

The package as it was at commit ``REV`` is extracted (``git archive``) into a temporary folder
as ``approxctl_base``, its imports renamed, so both versions run side by side on the same batch
and model: a shared VM's drift then hits both alike, where two profiles minutes apart differ by
up to 20%. Each round runs float, the earlier version and this one for 2 untimed and 3 timed
steps each (SGD, learning rate 0, so every round times the same weights); the line printed gives
the medians and the median (first-third quartile) of the per-round ratio this/earlier.

``--same-training`` instead trains both versions from the same weights and seed for four inject
and two exact steps (SGD, learning rate 0.05, momentum 0.9, batches of 64) and says whether every
weight and buffer came out equal, bit for bit. The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from round_robin import (
    add_batch_and_model_options,
    batch_and_model,
    ready_to_train,
    seconds_per_step,
)

import approxctl
from approxctl.pipeline import DataOptions

ROOT = Path(__file__).resolve().parent.parent
BASE = "approxctl_base"


def import_commit(rev: str, into: Path) -> ModuleType:
    """The ``approxctl`` package of commit ``rev``, importable as ``approxctl_base``."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "approxctl"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    package = into / BASE
    (into / "approxctl").rename(package)
    pattern = re.compile(r"\bapproxctl(?=[.\s\"'])")
    for path in package.rglob("*.py"):
        path.write_text(pattern.sub(BASE, path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(BASE)


def time_versions(args: argparse.Namespace, base: ModuleType) -> None:
    x, y, model = batch_and_model(args.model, args.batch_size, args.weights)
    nets = {"float": copy.deepcopy(model).train()}
    for name, pkg in (("earlier", base), ("this", approxctl)):
        nets[name] = ready_to_train(copy.deepcopy(model), args.target, x, pkg)
        pkg.set_mode(nets[name], args.mode)
    steps = {}
    for name, net in nets.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)

        def step(net: torch.nn.Module = net, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(seconds_per_step(step))
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["this"], times["earlier"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"{args.model} {args.target} {args.mode}, batch {args.batch_size}: float "
        f"{median['float']:.1f} ms, {args.rev} {median['earlier']:.1f} ms, this tree "
        f"{median['this']:.1f} ms; this/{args.rev} per round {statistics.median(ratios):.3f} "
        f"({q1:.3f}-{q3:.3f})"
    )


def compare_training(args: argparse.Namespace, base: ModuleType) -> None:
    _, _, model = batch_and_model(args.model, args.batch_size, args.weights)
    loader = DataOptions(batch_size=64).load().train
    batches = [batch for _, batch in zip(range(6), loader, strict=False)]
    states = []
    for pkg in (base, approxctl):
        torch.manual_seed(0)
        net = ready_to_train(copy.deepcopy(model), args.target, batches[0][0], pkg)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(1)
        for i, (x, y) in enumerate(batches):
            pkg.set_mode(net, "inject" if i < 4 else "exact")
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        states.append(net.state_dict())
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    verdict = "identical" if not differ else f"DIFFERENT in {', '.join(differ[:5])}"
    if differ:  # how far apart: each tensor's largest difference, relative to its largest value
        relative = max(
            float((states[0][k].double() - states[1][k].double()).abs().max())
            / max(float(states[1][k].double().abs().max()), 1e-30)
            for k in differ
        )
        verdict += f" (largest relative difference {relative:.1e})"
    print(f"{args.model} {args.target}, 4 inject + 2 exact steps: {verdict} to {args.rev}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="the earlier commit (any git revision)")
    parser.add_argument("--target", default="analog", choices=["am", "sc", "analog"])
    parser.add_argument("--mode", default="inject", choices=["inject", "exact"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--same-training", action="store_true")
    add_batch_and_model_options(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = import_commit(args.rev, Path(folder))
        (compare_training if args.same_training else time_versions)(args, base)


if __name__ == "__main__":
    main()
