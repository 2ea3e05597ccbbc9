"""Which config dataclass a shipped recipe is for: the method is named in the file name (``digits_boot_1step``)."""

from __future__ import annotations

from pathlib import Path

from stepdistill.trainers import BOOTConfig, DMDConfig, PhasedDMDConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def recipe_config(recipe: Path) -> type:
    """The config class of ``recipe``: BOOT for ``*_boot_*``, Phased DMD for ``*phased*`` recipes, DMD otherwise."""
    if "_boot_" in recipe.stem:
        return BOOTConfig
    return PhasedDMDConfig if "phased" in recipe.stem else DMDConfig
