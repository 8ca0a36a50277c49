"""Render docs/results.md tables from the JSON reports that benchmarks/results.sh leaves.

.venv/bin/python benchmarks/results_table.py runs/results > docs/results.md.tables
"""

from __future__ import annotations

import json
import sys
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


def main(folder: Path) -> None:
    print("### Table 4/5: top-1 on the Fashion-MNIST validation subset, exact emulation\n")
    print("| model | target | float | inference only | with model | error injection "
          "| fine-tuning | train time inject+FT / with model |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        base = load(folder, f"{model}-float")
        for target, label in TARGETS:
            inj, exact = (
                load(folder, f"{model}-{target}-inject"),
                load(folder, f"{model}-{target}-exact"),
            )
            if inj is None and exact is None:
                continue
            s = inj["summary"] if inj else {}
            ratio = "n/a"
            if inj and exact:
                ours = train_seconds(inj, "inject") + train_seconds(inj, "finetune")
                ratio = f"{ours:.0f} s / {train_seconds(exact, 'finetune'):.0f} s"
            print(
                f"| {model} | {label} | {pct(base['summary'].get('float') if base else None)} "
                f"| {pct(s.get('inference_only'))} "
                f"| {pct(exact['summary'].get('with_model') if exact else None)} "
                f"| {pct(s.get('error_injection'))} | {pct(s.get('fine_tuning'))} | {ratio} |"
            )
    print("\n### Table 2: training with the exact model, with and without the proxy activation\n")
    print("| model | target | no proxy (plain gradient) | with proxy |")
    print("|---|---|---|---|")
    for model in MODELS:
        for target, label in TARGETS:
            plain, exact = (
                load(folder, f"{model}-{target}-noproxy"),
                load(folder, f"{model}-{target}-exact"),
            )
            if (plain is None and exact is None) or target == "am":
                continue
            print(
                f"| {model} | {label} "
                f"| {pct(plain['summary'].get('with_model') if plain else None)} "
                f"| {pct(exact['summary'].get('with_model') if exact else None)} |"
            )
    print("\n### Table 7: seconds per training epoch (calibration included, validation not)\n")
    print("| model | target | float (no model) | error injection | with model / fine-tuning |")
    print("|---|---|---|---|---|")
    for model in MODELS:
        base = load(folder, f"{model}-float")
        for target, label in TARGETS:
            inj, exact = (
                load(folder, f"{model}-{target}-inject"),
                load(folder, f"{model}-{target}-exact"),
            )
            if inj is None and exact is None:
                continue
            print(
                f"| {model} | {label} | {per_epoch(base, 'pretrain')} | {per_epoch(inj, 'inject')} "
                f"| {per_epoch(exact, 'finetune')} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/results"))
