"""Render the profile tables of docs/benchmarks.md from `approxctl profile --json` documents.

    .venv/bin/python benchmarks/profile_table.py runs/profiles

reads FOLDER/profile_MODEL_TARGET.json, as benchmarks/profile_all.sh (CPU) and
benchmarks/gpu_check.sh (GPU) leave them, and prints two markdown tables: step times and their
ratios to float beside the paper's (its Table 7, RTX 3090), then memory and checkpointing. A
ratio of medians that lies outside the middle half of its per-round ratios (the machine's speed
moved during the run; ``approxctl.profile.unsteady_ratios``) is marked with a dagger.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from approxctl.profile import unsteady_ratios

MODELS = ("tinyconv", "resnet_tiny")
TARGETS = (("sc", "sc"), ("am", "approx-mult"), ("analog", "analog"))
# The paper's Table 7 (seconds per epoch, RTX 3090, batch 256): without model, with model (the
# exact emulation), error injection; the ratios are those of the issue and SPEC section 8.
PAPER_SECONDS = {
    ("tinyconv", "sc"): (3.86, 9.50, 3.90),
    ("tinyconv", "am"): (3.86, 28.3, 4.20),
    ("tinyconv", "analog"): (2.13, 3.91, 2.73),
    ("resnet_tiny", "sc"): (8.51, 13.3, 8.65),
    ("resnet_tiny", "am"): (8.13, 38.4, 9.11),
    ("resnet_tiny", "analog"): (4.88, 8.51, 6.53),
}
DAGGER = "†"


def load(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for model in MODELS:
        for short, _ in TARGETS:
            path = folder / f"profile_{model}_{short}.json"
            if path.exists():
                found[model, short] = json.loads(path.read_text())
    return found


def ratio_cell(doc: dict[str, Any], mode: str, checkpointing: bool = False) -> str:
    prefix = "checkpointing_" if checkpointing else ""
    ratio = doc[prefix + "ratios"][mode]
    low, high = doc[prefix + "ratio_quartiles"][mode]
    name = mode + (" + checkpointing" if checkpointing else "")
    mark = DAGGER if name in unsteady_ratios(doc) else ""
    return f"{ratio:.2f}{mark} ({low:.2f}-{high:.2f})"


def paper_cell(model: str, short: str) -> str:
    plain, exact, inject = PAPER_SECONDS[model, short]
    return f"{exact / plain:.2f}, {inject / plain:.2f}"


def header(docs: dict[tuple[str, str], dict[str, Any]]) -> str:
    """One line of what every run shares (device, batch, input, rounds), or each run's own."""
    keys = ("device", "batch_size", "input_shape", "data", "iters")
    settings = {json.dumps([doc.get(k) for k in keys]) for doc in docs.values()}
    if len(settings) > 1:
        return "Runs with different settings: see each JSON document."
    doc = next(iter(docs.values()))
    shape = "x".join(str(v) for v in doc["input_shape"])
    source = doc.get("data") or "random inputs"
    return (
        f"Device: {doc['device']}; batch {doc['batch_size']} of {shape} ({source}); median of "
        f"{doc.get('iters', '?')} round-robin rounds per configuration."
    )


def step_table(docs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "| model | target | float ms/step | exact ms/step | inject ms/step | exact/float "
        "(per round) | inject/float (per round) | paper exact/float, inject/float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, short), doc in docs.items():
        modes = doc["modes"]
        ms = [f"{1000 * modes[m]['step_s']:.1f}" for m in ("float", "exact", "inject")]
        lines.append(
            f"| {model} | {dict(TARGETS)[short]} | {' | '.join(ms)} | "
            f"{ratio_cell(doc, 'exact')} | {ratio_cell(doc, 'inject')} | "
            f"{paper_cell(model, short)} |"
        )
    return lines


def memory_table(docs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = [
        "| model | target | memory MB: float / exact / inject | with checkpointing: exact / "
        "inject | exact/float with checkpointing | inject/float with checkpointing |",
        "|---|---|---|---|---|---|",
    ]
    for (model, short), doc in docs.items():
        if "checkpointing" not in doc:
            continue
        plain = " / ".join(f"{doc['modes'][m]['peak_mem_mb']:.0f}" for m in
                           ("float", "exact", "inject"))  # fmt: skip
        ckpt = " / ".join(f"{doc['checkpointing'][m]['peak_mem_mb']:.0f}" for m in
                          ("exact", "inject"))  # fmt: skip
        lines.append(
            f"| {model} | {dict(TARGETS)[short]} | {plain} | {ckpt} | "
            f"{ratio_cell(doc, 'exact', True)} | {ratio_cell(doc, 'inject', True)} |"
        )
    return lines


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: profile_table.py FOLDER (with profile_MODEL_TARGET.json documents)")
    docs = load(Path(sys.argv[1]))
    if not docs:
        sys.exit(f"no profile_MODEL_TARGET.json in {sys.argv[1]}")
    memory = next(iter(docs.values())).get("memory", "")
    steps, memories = step_table(docs), memory_table(docs)
    print(header(docs))
    print()
    print("\n".join(steps))
    print()
    print(f"Memory ({memory}):")
    print()
    print("\n".join(memories))
    if any(DAGGER in line for line in steps + memories):
        print()
        print(f"{DAGGER} outside its per-round range: the range is the figure to read.")


if __name__ == "__main__":
    main()
