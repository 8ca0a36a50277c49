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
    "calib_every", "val_every", "bn_recalib", "amp", "checkpointing", "device", "options",
    "description",
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
    for key, value in recipe.items():
        kind = _KINDS.get(key)
        if kind is None:
            continue
        if key in ("mean", "std") and _is(value, "number"):
            recipe[key] = value = [value]  # one value for every channel
        if not _is(value, kind):
            raise ApproxError(
                f"{path}: {key} = {value!r} should be {_KIND_TEXT[kind]}; fix the recipe"
            )
    return recipe


# The value each recipe key takes (TOML already gives the types; a typo like lr = "0.1" is
# refused here rather than deep inside training).
_KINDS = {
    **dict.fromkeys(
        ("source", "target", "weights", "data", "optimizer", "scheduler", "device",
         "description"),
        "string",
    ),
    **dict.fromkeys(
        ("image_size", "limit_train", "limit_val", "batch_size", "workers", "pretrain",
         "epochs", "seed", "calib_per_epoch", "calib_every", "val_every", "bn_recalib"),
        "integer",
    ),
    **dict.fromkeys(("finetune", "lr", "momentum", "weight_decay"), "number"),
    **dict.fromkeys(("amp", "checkpointing"), "boolean"),
    "exclude": "strings",
    "mean": "numbers",
    "std": "numbers",
}  # fmt: skip
_KIND_TEXT = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "strings": "a list of strings",
    "numbers": "a number or a list of numbers",
}


def _is(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    item = "string" if kind == "strings" else "number"
    return isinstance(value, list) and all(_is(v, item) for v in value)


def pick(flag: Any, recipe: dict[str, Any], key: str, default: Any) -> Any:
    """The command-line value if given, else the recipe's, else the default."""
    if flag is not None:
        return flag
    return recipe.get(key, default)
