"""Config parsing: ``--config recipe.yaml`` first, then ``--key value`` overrides, into a config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _converter(tp: Any):
    """A function turning a CLI string or YAML value into the field type ``tp``."""
    base, optional = _unwrap_optional(tp)

    def convert(value: Any) -> Any:
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
            return None
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (elem,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_converter(elem)(v) for v in value]
        if base is bool:
            return _parse_bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        return value if base is Any else base(value)

    return convert


def parse_config(cls: type, argv: Sequence[str] | None = None) -> Any:
    """Build a config dataclass from ``--config recipe.yaml`` and ``--key value`` overrides.

    The YAML file sets defaults; command-line flags override them; ``__post_init__`` validates the
    result. Unknown keys (in YAML or on the command line) are errors. Booleans accept true/false,
    lists accept ``--student_timesteps 999 749`` or ``999,749``.

    Args:
        cls: The config dataclass (e.g. ``DMDConfig``).
        argv: Arguments (``sys.argv[1:]`` when ``None``).
    """
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe {str(path)!r} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Recipe {str(path)!r} must be a YAML mapping of config fields.")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise ValueError(f"Recipe {str(path)!r} has unknown key(s) {unknown}; valid keys: {names}.")
        for key, value in loaded.items():
            try:
                values[key] = _converter(hints[key])(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"Recipe {str(path)!r}: bad value for {key!r}: {err}") from err
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML recipe; command-line flags override it.")
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"type": _converter(hints[f.name]), "help": f.metadata.get("help", ""),
                                  "default": argparse.SUPPRESS}
        if typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = str
        parser.add_argument(f"--{f.name}", **kwargs)
    args = vars(parser.parse_args(rest))
    args.pop("config", None)
    for key, value in args.items():
        values[key] = _converter(hints[key])(value if not isinstance(value, list) else " ".join(value))
    return cls(**values)


__all__ = ["parse_config"]
