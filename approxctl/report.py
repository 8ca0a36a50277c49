"""report.json and report.md (SPEC section 5), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from approxctl.io import atomic_write_all


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def eval_markdown(doc: dict[str, Any]) -> str:
    """A readable report of ``approxctl eval``: accuracy per mode, then per-layer error."""
    lines = [
        f"# Evaluation of {doc['model']}",
        "",
        f"Target: {doc['target'] or 'none (float model)'}; data: {doc['data']['name']} "
        f"({doc['data']['val_samples']} validation images, {doc['data']['preprocessing']}); "
        f"device: {doc['device']}."
        + (f" BatchNorm statistics re-estimated in each mode on {doc['bn_recalib']} training "
           "batches first." if doc.get("bn_recalib") else ""),
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
    """report.json and report.md, both or (when a write fails) neither."""
    text = json.dumps(doc, indent=2, default=str) + "\n"
    atomic_write_all(
        [
            (directory / "report.md", lambda tmp: tmp.write_text(markdown)),
            (directory / "report.json", lambda tmp: tmp.write_text(text)),
        ]
    )


COLUMNS = (
    ("inference_only", "Inference only"),
    ("with_model", "With model"),
    ("error_injection", "Error injection"),
    ("fine_tuning", "Fine-tuning"),
)


def train_markdown(doc: dict[str, Any]) -> str:
    """A readable report of ``approxctl train`` in the shape of the paper's Tables 5 and 7."""
    summary = doc["summary"]
    train = doc["train"]
    lines = [
        f"# Training {doc['model']} for {doc['target']}",
        "",
        f"Data: {doc['data']['name']} ({doc['data']['train_samples']} training / "
        f"{doc['data']['val_samples']} validation images, {doc['data']['preprocessing']}); "
        f"device: {doc['device']}; {doc['seconds']:.0f} s in all; peak memory "
        f"{doc['peak_memory_mb']:.0f} MB.",
        "",
        f"Schedule: {train['pretrain']} float pretraining + {train['epochs']} error-injection + "
        f"{train['finetune']} fine-tuning epochs; {train['optimizer']} lr {train['lr']}, "
        f"{train['scheduler']} schedule, seed {train['seed']}.",
        "",
        "## Accuracy on the hardware (exact mode, validation top-1; paper Table 5)",
        "",
        "| " + " | ".join(label for _, label in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        "| "
        + " | ".join(_pct(summary[key]["top1"]) if key in summary else "-" for key, _ in COLUMNS)
        + " |",
    ]
    if "float" in summary:
        lines += ["", f"Float model after pretraining: {_pct(summary['float']['top1'])} top-1."]
    lines += [
        "",
        "## Epochs (paper Table 7: time per epoch per phase)",
        "",
        "| phase | epoch | fraction | train loss | train top-1 | val top-1 | seconds | "
        "calibrations (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["history"]:
        val = _pct(r["val"]["top1"]) if r["val"] else "-"
        lines.append(
            f"| {r['phase']} | {r['epoch']} | {r['fraction']:g} | {r['train_loss']:.4f} | "
            f"{_pct(r['train_top1'])} | {val} | {r['seconds']:.1f} | "
            f"{r['calibrations']} ({r['calibration_seconds']:.1f}) |"
        )
    lines += [
        "",
        "## Per-layer emulation error (exact - proxy over the output's std, last calibration)",
        "",
        "| layer | weight | error mean | error std |",
        "|---|---|---|---|",
    ]
    for row in doc["layers"]:
        lines.append(
            f"| {row['name']} | {'x'.join(map(str, row['shape']))} | "
            f"{row.get('rel_err_mean', float('nan')):+.4f} | "
            f"{row.get('rel_err_std', float('nan')):.4f} |"
        )
    if doc.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in doc["plots"]]
    return "\n".join(lines) + "\n"
