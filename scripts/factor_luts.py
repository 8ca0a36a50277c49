"""Regenerate approxctl/luts/factors/*.npz: exact integer factors of the bundled tables.

    python scripts/factor_luts.py

Each file is named by the table's digest (approxctl.luts.factor.table_digest) and holds ``left``
(M, r) and ``right`` (r, M) with ``left @ right == table``. Tables of rank above MAX_RANK get
none (the gather kernel serves them). Takes a minute or two (sympy's LLL).
"""

from __future__ import annotations

import time

import numpy as np

from approxctl.luts import bundled_luts, load_lut
from approxctl.luts.factor import FACTOR_DIR, factorize, table_digest


def main() -> None:
    FACTOR_DIR.mkdir(exist_ok=True)
    for name in bundled_luts():
        table = load_lut(name).numpy()
        start = time.perf_counter()
        factors = factorize(table)
        seconds = time.perf_counter() - start
        if factors is None:
            print(f"{name}: rank above the limit, no factors")
            continue
        path = FACTOR_DIR / f"{table_digest(table)}.npz"
        np.savez_compressed(path, left=factors.left, right=factors.right)
        print(f"{name}: rank {factors.rank}, float32 bound {factors.bound}, {seconds:.1f} s")


if __name__ == "__main__":
    main()
