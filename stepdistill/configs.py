"""Config dataclasses from a YAML recipe and command-line flags, on ``transformers.HfArgumentParser``.

One parser for every command (trl's ``TrlParser`` pattern): ``--config recipe.yaml`` sets defaults, ``--key value``
flags override them, and each dataclass's ``__post_init__`` validates the result::

    cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml", "--max_train_steps", "10"])
    clf, teacher = parse_configs((ClassifierConfig, TeacherConfig), argv, prefixes=("classifier_", "teacher_"))

Values are converted to the field types the same way from YAML and from flags:

* ``bool``: ``true`` / ``false`` (also yes / no, on / off, 1 / 0); a bare ``--flag`` means true, and a field that
  defaults to true also gets ``--no_flag``;
* ``int`` / ``float``: ``1e-4`` is a float even where YAML 1.1 reads it as a string; ``1000.0`` is accepted for
  an int field;
* lists: ``--student_timesteps 999 749 499``, ``--student_timesteps 999,749,499`` or a YAML list;
* ``X | None``: ``none`` / ``null`` (any case) give ``None``.

Unknown keys, in the recipe or on the command line, are errors that list the valid ones. Several dataclasses
parse together: every flag (and recipe key) belongs to the one dataclass that declares it; a name declared by
two of them is an error unless ``prefixes`` tell them apart (``--teacher_seed`` and ``--classifier_seed``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

#: Strings that mean ``None`` for an optional field.
NONE_STRINGS = ("none", "null")
_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


# --------------------------------------------------------------------------------------------------
# converting a YAML value or a command-line string to a field type
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return functools.reduce(operator.or_, rest), True
    return tp, False


def _means_none(value: Any) -> bool:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_STRINGS)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def _to_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Path)):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _split_list(text: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", text.strip().strip("[]")) if part]


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def field_value_parser(tp: Any) -> Callable[[Any], Any]:
    """A function turning a YAML value or a command-line string (or list of strings) into type ``tp``.

    Args:
        tp: A resolved type hint: ``bool``, ``int``, ``float``, ``str``, ``list[X]``, ``tuple[X, ...]``,
            ``Literal[...]``, an ``Enum``, or any of them ``| None``.

    Returns:
        A converter raising ``ValueError`` with a short reason on a bad value.

    Example:
        >>> field_value_parser(list[float] | None)("999,749")
        [999.0, 749.0]
    """
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        element = field_value_parser((typing.get_args(base) or (str,))[0])

        def convert_list(value: Any) -> Any:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            items = [p for item in items for p in (_split_list(item) if isinstance(item, str) else [item])]
            out = [element(item) for item in items]
            return tuple(out) if origin is tuple else out

        convert = convert_list
    elif origin is typing.Literal:
        choices = typing.get_args(base)

        def convert(value: Any) -> Any:
            for choice in choices:
                if value == choice or str(value) == str(choice):
                    return choice
            raise ValueError(f"expected one of {list(choices)}, got {value!r}")

    elif isinstance(base, type) and issubclass(base, Enum):

        def convert(value: Any) -> Any:
            try:
                return base(value)
            except ValueError:
                raise ValueError(f"expected one of {[m.value for m in base]}, got {value!r}") from None

    elif base in _SCALARS:
        convert = _SCALARS[base]
    else:

        def convert(value: Any) -> Any:
            return value

    def parse(value: Any) -> Any:
        if _means_none(value):
            if optional:
                return None
            if value is None:
                raise ValueError("null is only allowed for optional fields")
        return convert(value)

    return parse


# --------------------------------------------------------------------------------------------------
# the parser
@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one flag's value goes: ``configs[index].<name>``, converted by ``parse``."""

    index: int
    name: str
    parse: Callable[[Any], Any]
    is_list: bool


class ConfigParser(HfArgumentParser):
    """Parse one or several config dataclasses from ``--config recipe.yaml`` and ``--key value`` flags.

    Each field becomes a flag (``HfArgumentParser`` adds it: help from ``metadata["help"]``, defaults shown, bool
    fields take an optional value, lists take several); the values are then converted with
    :func:`field_value_parser`, so YAML and flags accept the same spellings.

    Args:
        classes: The config dataclasses, in the order :meth:`parse` returns them.
        prefixes: One flag-name prefix per class (``""`` for none), e.g. ``("classifier_", "teacher_")``.
        **kwargs: Passed to ``argparse.ArgumentParser`` (``prog``, ``description``, ...).

    Raises:
        ValueError: when two classes declare the same flag name, or a field is called ``config``.

    Example:
        >>> parser = ConfigParser((DMDConfig,), prog="stepdistill train dmd")
        >>> (cfg,) = parser.parse(["--config", "recipes/digits_dmd2_1step.yaml", "--use_gan", "true"])
    """

    def __init__(self, classes: Sequence[type], prefixes: Sequence[str] | None = None, **kwargs: Any) -> None:
        classes = tuple(classes)
        prefixes = tuple(prefixes) if prefixes is not None else ("",) * len(classes)
        if len(prefixes) != len(classes):
            raise ValueError(f"Got {len(prefixes)} prefixes for {len(classes)} config classes.")
        owners: dict[str, type] = {}
        for cls, prefix in zip(classes, prefixes, strict=True):
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls!r} is not a dataclass.")
            names = [prefix + f.name for f in dataclasses.fields(cls) if f.init]
            if "config" in names:
                raise ValueError(f"{cls.__name__} has a field called 'config', which is the recipe flag.")
            shared = [n for n in names if n in owners]
            if shared:
                raise ValueError(f"{shared} declared by both {owners[shared[0]].__name__} and {cls.__name__}: "
                                 "give one of them a prefix (prefixes=...).")
            owners.update(dict.fromkeys(names, cls))
        self.config_classes, self.prefixes = classes, prefixes
        self.slots: dict[str, _Slot] = {}
        self._added = 0  # classes whose fields are added so far
        kwargs.setdefault("usage", "%(prog)s [-h] [--config RECIPE.yaml] [--FIELD VALUE ...]")
        kwargs.setdefault("allow_abbrev", False)  # a misspelt flag must not silently match a longer one
        if "description" not in kwargs and len(classes) == 1:  # (several: each group shows its class's summary)
            kwargs["description"] = (classes[0].__doc__ or "").strip().split("\n")[0]
        super().__init__(classes, **kwargs)  # HfArgumentParser adds every field via _add_dataclass_arguments
        self.add_argument("--config", default=None, metavar="RECIPE.yaml",
                          help="YAML mapping of flag names to values; flags given here override it.")

    def _add_dataclass_arguments(self, dtype: type) -> None:
        # HfArgumentParser calls this once per class. Fields are added through copies (HfArgumentParser rewrites
        # ``field.type``; the class's own fields stay untouched) renamed with the class's prefix.
        index, self._added = self._added, self._added + 1
        prefix = self.prefixes[index]
        summary = (dtype.__doc__ or "").strip().split("\n")[0] if len(self.config_classes) > 1 else None
        group = self.add_argument_group(dtype.__name__ if not prefix else f"{dtype.__name__} (--{prefix}*)", summary)
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            dest = prefix + f.name
            hinted = copy.copy(f)
            hinted.name, hinted.type = dest, hints[f.name]
            self._parse_dataclass_field(group, hinted)
            base, _ = _unwrap_optional(hints[f.name])
            slot = _Slot(index, f.name, field_value_parser(hints[f.name]), typing.get_origin(base) in (list, tuple))
            self.slots[dest] = slot
            self._use_field_types(dest, slot, is_bool=base is bool)

    def _use_field_types(self, dest: str, slot: _Slot, is_bool: bool) -> None:
        """Let the flag accept what the recipe accepts (``none``, ``999,749``, ``1e-4`` ...)."""
        for action in self._actions:
            if action.dest != dest or f"--{dest}" not in action.option_strings:
                continue  # (the store_false action of a --no_<flag> needs nothing)
            if slot.is_list:
                action.type = str  # converted as a whole in parse(): tokens may hold several comma-separated items
            else:
                action.type = _argparse_type(slot.parse, dest)
                if action.choices and not all(c in action.choices for c in map(slot.parse, action.choices)):
                    action.choices = None  # (an Enum's values): the converter checks them
            if is_bool:
                action.nargs, action.const = "?", True

    @property
    def valid_keys(self) -> list[str]:
        """The flag names (without ``--``), which are also the recipe's keys."""
        return list(self.slots)

    def read_recipe(self, path: str | Path) -> dict[str, Any]:
        """Load a YAML recipe: a mapping of flag names to values, converted to the field types.

        Raises:
            FileNotFoundError: when the file does not exist.
            ValueError: for a file that is not a mapping, an unknown key (the message lists the valid ones), or
                a value of the wrong type.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe {str(path)!r} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Recipe {str(path)!r} must be a YAML mapping of config fields.")
        unknown = sorted(str(k) for k in loaded if k not in self.slots)
        if unknown:
            raise ValueError(f"Recipe {str(path)!r} has unknown key(s) {unknown}; valid keys: {self.valid_keys}.")
        values = {}
        for key, value in loaded.items():
            try:
                values[key] = self.slots[key].parse(value)
            except ValueError as err:
                raise ValueError(f"Recipe {str(path)!r}: bad value for {key!r}: {err}.") from None
        return values

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``argv`` (``sys.argv[1:]`` when ``None``) into one instance per config class.

        Order: field defaults, then the ``--config`` recipe, then the flags; then ``__post_init__`` runs.

        Raises:
            FileNotFoundError, ValueError: from the recipe (see :meth:`read_recipe`) or from a class's validation.
            SystemExit: for a bad or unknown flag (argparse's usage error, status 2) and for ``--help``.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", default=None)
        recipe = pre.parse_known_args(argv)[0].config
        if recipe:
            values = self.read_recipe(recipe)
            for action in self._actions:
                if action.dest in values:
                    action.default, action.required = values[action.dest], False
        namespace, unknown = self.parse_known_args(argv)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}; valid flags: "
                       f"{', '.join('--' + k for k in ['config', *self.slots])}")
        kwargs: list[dict[str, Any]] = [{} for _ in self.config_classes]
        for dest, slot in self.slots.items():
            value = getattr(namespace, dest)
            if slot.is_list:
                try:
                    value = slot.parse(value)
                except ValueError as err:
                    self.error(f"argument --{dest}: {err}")
            kwargs[slot.index][slot.name] = value
        return tuple(cls(**kw) for cls, kw in zip(self.config_classes, kwargs, strict=True))


def _argparse_type(parse: Callable[[Any], Any], dest: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = dest
    return convert


def parse_configs(
    classes: Sequence[type], argv: Sequence[str] | None = None, *, prefixes: Sequence[str] | None = None,
    **parser_kwargs: Any,
) -> tuple[Any, ...]:
    """Build several config dataclasses from ``--config recipe.yaml`` and ``--key value`` flags.

    Args:
        classes: The config dataclasses; every flag / recipe key goes to the class that declares it.
        argv: Arguments (``sys.argv[1:]`` when ``None``).
        prefixes: One flag-name prefix per class (``""`` for none), needed when two classes share field names.
        **parser_kwargs: ``prog``, ``description`` ... of the :class:`ConfigParser`.

    Returns:
        One instance per class, in the order of ``classes``.

    Example:
        >>> clf, teacher = parse_configs((ClassifierConfig, TeacherConfig), ["--teacher_seed", "3"],
        ...                              prefixes=("classifier_", "teacher_"))
    """
    return ConfigParser(classes, prefixes=prefixes, **parser_kwargs).parse(argv)


def parse_config(cls: type, argv: Sequence[str] | None = None, **parser_kwargs: Any) -> Any:
    """Build one config dataclass from ``--config recipe.yaml`` and ``--key value`` flags (see :func:`parse_configs`).

    Example:
        >>> cfg = parse_config(DMDConfig, ["--config", "recipes/digits_dmd2_1step.yaml", "--max_train_steps", "10"])
    """
    return parse_configs((cls,), argv, **parser_kwargs)[0]


__all__ = ["NONE_STRINGS", "ConfigParser", "field_value_parser", "parse_config", "parse_configs"]
