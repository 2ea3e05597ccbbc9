"""Which config dataclass a shipped recipe is for: the method is named in the file name (``digits_boot_1step``)."""

from __future__ import annotations

from pathlib import Path

from stepdistill.trainers import BOOTConfig, DMDConfig, MSDConfig, PhasedDMDConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def recipe_config(recipe: Path) -> type:
    """The config class of ``recipe``: BOOT for ``*_boot_*``, Phased DMD for ``*phased*``, MSD for ``*_msd*`` recipes,
    DMD otherwise."""
    if "_boot_" in recipe.stem:
        return BOOTConfig
    if "phased" in recipe.stem:
        return PhasedDMDConfig
    return MSDConfig if "_msd" in recipe.stem else DMDConfig
