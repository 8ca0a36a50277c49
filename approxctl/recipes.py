"""TOML recipes (SPEC section 1): a training setup in a file; command-line flags override it.

Top-level keys are the ``approxctl train`` options with underscores (``epochs``,
``batch_size``, ``data``, ``target``, ``source``, ...); an ``[options]`` table holds target
options by their dataclass names (``length``, ``lut``, ``adc_bits``, ...). Unknown keys are
errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from approxctl.errors import ApproxError

RECIPE_KEYS = {
    "source", "target", "weights", "exclude", "data", "image_size", "mean", "std",
    "limit_train", "limit_val", "batch_size", "workers", "pretrain", "epochs", "finetune", "lr",
    "optimizer", "momentum", "weight_decay", "scheduler", "seed", "calib_per_epoch",
    "calib_every", "val_every", "amp", "checkpointing", "device", "options", "description",
}  # fmt: skip


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ApproxError(f"recipe '{path}' does not exist")
    try:
        recipe = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ApproxError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ApproxError(
            f"{path}: unknown recipe key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(RECIPE_KEYS))}"
        )
    if "options" in recipe and not isinstance(recipe["options"], dict):
        raise ApproxError(f"{path}: [options] must be a table of target options")
    return recipe


def pick(flag: Any, recipe: dict[str, Any], key: str, default: Any) -> Any:
    """The command-line value if given, else the recipe's, else the default."""
    if flag is not None:
        return flag
    return recipe.get(key, default)
