"""Exact integer low-rank factorizations of multiplier tables (SPEC section 7).

Many EvoApprox tables are exactly low rank (mul7u_09Y: 15, mul7u_0FV: 3, mul8u_17MJ: 4), so a
table lookup ``lut[a, b]`` equals ``sum_r left[a, r] * right[r, b]`` with *integer* factors, and a
LUT GEMM becomes ``r`` ordinary GEMMs/convolutions. Integer factors exist for any integer matrix
(a lattice basis of its column space, here from the Hermite normal form, LLL-reduced so the
entries stay small); ``bound`` = max over (a, b) of ``sum_r |left[a, r]| |right[r, b]|`` tells how
many products a float32 accumulator may sum before it could lose exactness (2^24).

Bundled tables ship their factors in ``factors/*.npz`` (made by ``scripts/factor_luts.py``);
every factorization is checked against its table when loaded.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FLOAT32_EXACT = 1 << 24
# Above this rank a gather kernel beats r GEMMs, and sympy's reduction gets slow.
MAX_RANK = 24
FACTOR_DIR = Path(__file__).parent / "factors"


@dataclass(frozen=True, eq=False)  # hashed by identity: caches key on the object
class LutFactors:
    """``table == left @ right`` exactly; row index = activation, column index = weight."""

    left: np.ndarray  # (M, r) int64
    right: np.ndarray  # (r, M) int64

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @functools.cached_property
    def bound(self) -> int:
        return int((np.abs(self.left) @ np.abs(self.right)).max())

    def check(self, table: np.ndarray) -> bool:
        return bool(np.array_equal(self.left @ self.right, table.astype(np.int64)))


def _lattice_basis(t: np.ndarray) -> np.ndarray:
    """(M, r) integer matrix whose columns form an LLL-reduced basis of t's column lattice."""
    from sympy import Matrix
    from sympy.matrices.normalforms import hermite_normal_form
    from sympy.polys.domains import ZZ
    from sympy.polys.matrices import DomainMatrix

    hnf = hermite_normal_form(Matrix(t.tolist()))  # columns span the same lattice as t's
    reduced = DomainMatrix.from_Matrix(hnf.T).convert_to(ZZ).lll()
    return np.array(reduced.to_Matrix().tolist(), dtype=np.int64).T


def _integer_solution(basis: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    coef = np.linalg.lstsq(basis.astype(np.float64), t.astype(np.float64), rcond=None)[0]
    rounded = np.round(coef).astype(np.int64)
    return rounded if np.array_equal(basis @ rounded, t) else None


def factorize(table: np.ndarray, max_rank: int = MAX_RANK) -> LutFactors | None:
    """An exact integer factorization with a small ``bound``, or None above ``max_rank``.

    Both sides are tried (reducing the activation or the weight factor); the one with the
    smaller float32 bound wins.
    """
    t = np.asarray(table, dtype=np.int64)
    if np.linalg.matrix_rank(t.astype(np.float64)) > max_rank:
        return None
    candidates = []
    left = _lattice_basis(t)
    right = _integer_solution(left, t)
    if right is not None:
        candidates.append(LutFactors(left, right))
    right_t = _lattice_basis(t.T)
    left_t = _integer_solution(right_t, t.T)
    if left_t is not None:
        candidates.append(
            LutFactors(np.ascontiguousarray(left_t.T), np.ascontiguousarray(right_t.T))
        )
    good = [c for c in candidates if c.check(t)]
    return min(good, key=lambda c: c.bound) if good else None


def table_digest(table: np.ndarray) -> str:
    t = np.ascontiguousarray(table, dtype=np.int64)
    return hashlib.sha256(t.tobytes() + str(t.shape).encode()).hexdigest()[:16]


_CACHE: dict[str, LutFactors | None] = {}


def factors_for(table: torch.Tensor | np.ndarray) -> LutFactors | None:
    """Verified factors of ``table``: shipped for bundled tables, computed (once) otherwise."""
    t = table.cpu().numpy() if isinstance(table, torch.Tensor) else np.asarray(table)
    digest = table_digest(t)
    if digest not in _CACHE:
        shipped = FACTOR_DIR / f"{digest}.npz"
        found: LutFactors | None = None
        if shipped.is_file():
            with np.load(shipped, allow_pickle=False) as data:
                found = LutFactors(data["left"], data["right"])
            if not found.check(t):
                found = None
        if found is None:
            found = factorize(t)
        _CACHE[digest] = found
    return _CACHE[digest]
