"""report.json and report.md (SPEC section 5), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from approxctl.io import atomic_write_text


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def eval_markdown(doc: dict[str, Any]) -> str:
    """A readable report of ``approxctl eval``: accuracy per mode, then per-layer error."""
    lines = [
        f"# Evaluation of {doc['model']}",
        "",
        f"Target: {doc['target'] or 'none (float model)'}; data: {doc['data']['name']} "
        f"({doc['data']['val_samples']} validation images, {doc['data']['preprocessing']}); "
        f"device: {doc['device']}.",
        "",
        "| mode | top-1 | top-5 | loss | images | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for result in doc["results"]:
        lines.append(
            f"| {result['mode']} | {_pct(result['top1'])} | {_pct(result['top5'])} | "
            f"{result['loss']:.4f} | {result['samples']} | {result['seconds']:.1f} |"
        )
    for result in doc["results"]:
        if not result["layers"]:
            continue
        lines += [
            "",
            f"## Per-layer emulation error ({result['mode']} mode, evaluation data)",
            "",
            "Hardware output minus proxy output, in the layer's accumulator units and relative "
            "to the proxy output's standard deviation.",
            "",
            "| layer | error mean | error std | relative mean | relative std |",
            "|---|---|---|---|---|",
        ]
        for name, stats in result["layers"].items():
            lines.append(
                f"| {name} | {stats['err_mean']:.4g} | {stats['err_std']:.4g} | "
                f"{stats['rel_err_mean']:+.4f} | {stats['rel_err_std']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def write_report(directory: Path, doc: dict[str, Any], markdown: str) -> None:
    atomic_write_text(directory / "report.json", json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(directory / "report.md", markdown)
