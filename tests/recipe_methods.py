"""Which config dataclass a shipped recipe is for: the method is named in the file name (``digits_boot_1step``)."""

from __future__ import annotations

from pathlib import Path

from stepdistill.trainers import BOOTConfig, DMDConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def recipe_config(recipe: Path) -> type:
    """The config class of ``recipe``: BOOT for ``*_boot_*`` recipes, DMD otherwise."""
    return BOOTConfig if "_boot_" in recipe.stem else DMDConfig
