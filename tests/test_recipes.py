"""Shipped recipes parse and validate; flags override them; bad recipes are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from approxctl import targets
from approxctl.errors import ApproxError
from approxctl.recipes import load_recipe, pick
from approxctl.train import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_the_paper_setups_are_shipped() -> None:
    names = {p.name for p in RECIPES}
    for target in ("sc", "am", "analog"):
        assert f"{target}-resnet18-imagenet.toml" in names
        for model in ("tinyconv", "resnet_tiny"):
            assert f"{model}-cifar10-{target}.toml" in names
            assert f"{model}-fashion-mnist-{target}.toml" in names  # the quick starts


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_valid(path: Path) -> None:
    recipe = load_recipe(path)
    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{k: v for k, v in recipe.items() if k in fields})
    config.validate()
    targets.make_config(recipe["target"], **recipe.get("options", {}))


def test_table_8_epochs() -> None:
    by_name = {p.name: load_recipe(p) for p in RECIPES}
    assert (
        by_name["sc-resnet18-imagenet.toml"]["epochs"],
        by_name["sc-resnet18-imagenet.toml"]["finetune"],
    ) == (30, 5)
    assert (
        by_name["am-resnet18-imagenet.toml"]["epochs"],
        by_name["am-resnet18-imagenet.toml"]["finetune"],
    ) == (34, 1)
    assert (
        by_name["analog-resnet18-imagenet.toml"]["epochs"],
        by_name["analog-resnet18-imagenet.toml"]["finetune"],
    ) == (14, 0.25)


def test_flags_override_the_recipe_and_typos_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("epochs = 3\nlr = 0.1\n")
    recipe = load_recipe(path)
    assert pick(None, recipe, "epochs", 30) == 3
    assert pick(7, recipe, "epochs", 30) == 7
    assert pick(None, recipe, "finetune", 5) == 5
    path.write_text("epoch = 3\n")
    with pytest.raises(ApproxError, match="unknown recipe key"):
        load_recipe(path)
    path.write_text("epochs = \n")
    with pytest.raises(ApproxError, match="not valid TOML"):
        load_recipe(path)
