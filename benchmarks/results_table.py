"""Render docs/results.md tables from the JSON reports that benchmarks/results.sh leaves.

.venv/bin/python benchmarks/results_table.py runs/results > docs/results.md.tables
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODELS = ("tinyconv", "resnet_tiny")
TARGETS = (("sc", "Stochastic computing"), ("am", "Approximate multiplication (mul7u_09Y)"),
           ("analog", "Analog computing (4-bit ADC)"))  # fmt: skip


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def pct(entry: dict[str, Any] | None) -> str:
    return "n/a" if entry is None else f"{100 * entry['top1']:.2f}%"


def train_seconds(doc: dict[str, Any], phase: str) -> float:
    """Training time of one phase (calibration included, validation not)."""
    return sum(e["seconds"] for e in doc["history"] if e["phase"] == phase)


def per_epoch(doc: dict[str, Any] | None, phase: str) -> str:
    if doc is None:
        return "n/a"
    epochs = [e for e in doc["history"] if e["phase"] == phase]
    if not epochs:
        return "n/a"
    return f"{sum(e['seconds'] for e in epochs) / sum(e['fraction'] for e in epochs):.1f}"


def result(doc: dict[str, Any] | None, column: str) -> dict[str, Any] | None:
    return doc["summary"].get(column) if doc else None


def rows(folder: Path) -> Iterator[tuple[str, str, dict[str, Any | None]]]:
    """(model, target label, its runs by kind) for every model/target with any run."""
    for model in MODELS:
        base = load(folder, f"{model}-float")
        for target, label in TARGETS:
            runs = {kind: load(folder, f"{model}-{target}-{kind}")
                    for kind in ("inject", "exact", "noproxy")}  # fmt: skip
            if runs["inject"] is None and runs["exact"] is None:
                continue
            yield model, label, {"float": base, "target": target, **runs}


def setup(folder: Path) -> str:
    """Where and with which budget the runs of ``folder`` ran, from their reports."""
    devices, budgets = set(), set()
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        devices.add(doc.get("device", "?"))
        train = doc.get("train", {})
        if train.get("epochs") or train.get("finetune"):
            budgets.add(f"{train['epochs']} + {train['finetune']:g}")
    return (
        f"Runs in `{folder}` on {', '.join(sorted(devices))}; error-injection + fine-tune "
        f"epochs: {', '.join(sorted(budgets)) or 'n/a'}.\n"
    )


def main(folder: Path) -> None:
    print(setup(folder))
    print("### Table 4/5: top-1 on the Fashion-MNIST validation subset, exact emulation\n")
    print("| model | target | float | inference only | with model | error injection "
          "| fine-tuning | train time inject+FT / with model |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for model, label, runs in rows(folder):
        inj, exact = runs["inject"], runs["exact"]
        ratio = "n/a"
        if inj and exact:
            ours = train_seconds(inj, "inject") + train_seconds(inj, "finetune")
            ratio = f"{ours:.0f} s / {train_seconds(exact, 'finetune'):.0f} s"
        print(
            f"| {model} | {label} | {pct(result(runs['float'], 'float'))} "
            f"| {pct(result(inj, 'inference_only'))} | {pct(result(exact, 'with_model'))} "
            f"| {pct(result(inj, 'error_injection'))} | {pct(result(inj, 'fine_tuning'))} "
            f"| {ratio} |"
        )
    print("\n### Table 2: training with the exact model, with and without the proxy activation\n")
    print("| model | target | no proxy (plain gradient) | with proxy |")
    print("|---|---|---|---|")
    for model, label, runs in rows(folder):
        if runs["target"] == "am" or (runs["noproxy"] is None and runs["exact"] is None):
            continue
        print(
            f"| {model} | {label} | {pct(result(runs['noproxy'], 'with_model'))} "
            f"| {pct(result(runs['exact'], 'with_model'))} |"
        )
    print("\n### Table 7: seconds per training epoch (calibration included, validation not)\n")
    print("| model | target | float (no model) | error injection | with model / fine-tuning |")
    print("|---|---|---|---|---|")
    for model, label, runs in rows(folder):
        print(
            f"| {model} | {label} | {per_epoch(runs['float'], 'pretrain')} "
            f"| {per_epoch(runs['inject'], 'inject')} | {per_epoch(runs['exact'], 'finetune')} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results"))
