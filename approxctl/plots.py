"""Figures of a training run (SPEC section 5): convergence (paper Fig. 3) and per-layer error
against the proxy output with the fitted polynomials (paper Fig. 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from approxctl.error_models import PolynomialErrorModel
from approxctl.io import atomic_write
from approxctl.layers import approx_layers


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def convergence_plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation top-1 per epoch, coloured by phase, over the whole run."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours = {"pretrain": "tab:gray", "inject": "tab:blue", "finetune": "tab:red"}
    position = 0.0
    for record in history:
        position += record["fraction"]
        if record["val"] is not None:
            ax.plot(position, 100 * record["val"]["top1"], "o", color=colours[record["phase"]])
    xs = np.cumsum([r["fraction"] for r in history])
    ys = [100 * r["val"]["top1"] if r["val"] else np.nan for r in history]
    ax.plot(xs, ys, "-", color="black", alpha=0.3)
    for phase, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=phase)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)  (exact mode after pretraining)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def error_fit_plots(model: nn.Module, directory: Path) -> list[Path]:
    """One figure per type-1 layer: binned error mean/std vs proxy output and the fits."""
    written = []
    for name, layer in approx_layers(model):
        em = layer.error_model
        if not isinstance(em, PolynomialErrorModel) or em.binned is None:
            continue
        binned = em.binned
        lo, hi = em.domain.tolist()
        v = np.linspace(lo, hi, 200)
        grid = torch.from_numpy(v)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(binned["v"], binned["mean"], "o", ms=3, label="error mean (bins)")
        ax.plot(binned["v"], binned["std"], "s", ms=3, label="error std (bins)")
        ax.plot(v, em.mean_at(grid).numpy(), "-", label="mu(v) fit")
        ax.plot(v, em.std_at(grid).numpy(), "--", label="sigma(v) fit")
        ax.set_xlabel("proxy output v (accumulator units)")
        ax.set_ylabel("exact - proxy")
        ax.set_title(name)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(style="sci", scilimits=(-3, 4))
        fig.tight_layout()
        path = directory / f"error_{name.replace('.', '_')}.png"
        _save(fig, path)
        written.append(path)
    return written
