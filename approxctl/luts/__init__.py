"""Bundled EvoApproxLib multiplier tables and loading of users' own tables.

The tables come from EvoApproxLib (MIT licensed, Copyright 2018 EHW@FIT, Brno University of
Technology); see README.md in this folder for the attribution and citation, and metrics.csv for
each circuit's published error and power figures.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from approxctl.errors import ApproxError

DEFAULT_LUT = "mul7u_09Y"


@dataclass(frozen=True)
class LutInfo:
    """One bundled multiplier: its name, kind and the library's published figures."""

    name: str
    signed: bool
    bits: int
    mae_pct: float
    wce_pct: float
    mre_pct: float
    ep_pct: float
    power_mw: float
    area_um2: float
    delay_ns: float


def _data_dir() -> Path:
    return Path(str(resources.files(__name__)))


@functools.cache
def bundled_luts() -> dict[str, LutInfo]:
    """Name -> figures of every bundled table, in the order of metrics.csv."""
    out: dict[str, LutInfo] = {}
    with open(_data_dir() / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["name"]
            out[name] = LutInfo(
                name=name,
                signed=name.startswith("mul8s"),
                bits=int(name[3]),
                mae_pct=float(row["lib_MAE_pct"]),
                wce_pct=float(row["lib_WCE_pct"]),
                mre_pct=float(row["lib_MRE_pct"]),
                ep_pct=float(row["lib_EP_pct"]),
                power_mw=float(row["lib_PDK45_PWR_mW"]),
                area_um2=float(row["lib_PDK45_AREA_um2"]),
                delay_ns=float(row["lib_PDK45_DELAY_ns"]),
            )
    return out


def is_signed_lut_name(name: str) -> bool:
    """EvoApprox naming: mul8s_* are signed tables indexed [a + 128, b + 128]."""
    return Path(name).stem.startswith("mul8s")


def validate_lut(table: np.ndarray, *, signed: bool, origin: str) -> torch.Tensor:
    """Check a multiplier table's shape, dtype and range; return it as int64.

    Unsigned tables must be (128,128) or (256,256) of non-negative integers; signed tables
    (256,256). Values must fit the product range of the operands so sums cannot overflow int64.
    """
    if not isinstance(table, np.ndarray) or table.dtype.kind not in "iu":
        kind = getattr(table, "dtype", type(table))
        raise ApproxError(
            f"{origin}: a multiplier table must be an integer numpy array, got {kind}; "
            "save it with np.save(path, table.astype(np.int32))"
        )
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] not in (128, 256):
        raise ApproxError(
            f"{origin}: a multiplier table must have shape (128, 128) or (256, 256), "
            f"got {tuple(table.shape)}"
        )
    if signed and table.shape[0] != 256:
        raise ApproxError(
            f"{origin}: a signed table must have shape (256, 256) indexed [a+128, b+128]"
        )
    m = table.shape[0]
    limit = (m - 1) * (m - 1) * 4 if not signed else 128 * 128 * 4
    lo, hi = int(table.min()), int(table.max())
    if not signed and lo < 0:
        raise ApproxError(f"{origin}: an unsigned multiplier table has a negative entry ({lo})")
    if max(abs(lo), abs(hi)) > limit:
        raise ApproxError(
            f"{origin}: table entries reach {max(abs(lo), abs(hi))}, far beyond the product "
            f"range of {m}x{m} operands; is this really a multiplier table?"
        )
    return torch.from_numpy(table.astype(np.int64))


@functools.cache
def _load_cached(name: str, signed: bool) -> torch.Tensor:
    path = _data_dir() / f"{name}.npy"
    table = np.load(path, allow_pickle=False)
    return validate_lut(table, signed=signed, origin=name)


def load_lut(name_or_path: str | Path, *, signed: bool | None = None) -> torch.Tensor:
    """A multiplier table as an int64 (M, M) tensor, by bundled name or from a user's .npy file.

    ``signed`` says how the table is indexed (see SPEC 3.1); None takes it from the EvoApprox
    name (``mul8s_*`` are signed). Bundled tables are cached and shared; do not modify them.
    """
    text = str(name_or_path)
    if signed is None:
        signed = is_signed_lut_name(text)
    if text in bundled_luts():
        return _load_cached(text, signed)
    path = Path(text)
    if path.suffix != ".npy":
        known = ", ".join(sorted(bundled_luts()))
        raise ApproxError(
            f"unknown multiplier '{text}': give a bundled name ({known}) or a path to a .npy file"
        )
    if not path.is_file():
        raise ApproxError(f"multiplier table file '{path}' does not exist")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ApproxError(f"{path}: not a readable .npy array ({exc})") from None
    return validate_lut(table, signed=signed, origin=str(path))
