"""What the commands share: argument types and the one-line report of user errors."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


def int_list(text: str) -> list[int]:
    """Argument type: ``"0-3,7"`` -> ``[0, 1, 2, 3, 7]`` (inclusive ranges, as EDM's ``--seeds``)."""
    from ..evaluation.evaluate import parse_int_list

    try:
        values = parse_int_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no number (ranges go up: 0-399)")
    return values


def positive_int(text: str) -> int:
    """Argument type: an integer >= 1 (counts and sizes: ``--batch_size``, ``--num_samples``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def number(text: str) -> int | float:
    """Argument type: ``"999"`` -> ``999``, ``"499.5"`` -> ``499.5`` (timesteps keep their int-ness)."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def number_list(text: str) -> list[int | float]:
    """Argument type: comma-separated numbers (``"999,499"`` -> ``[999, 499]``)."""
    try:
        return [number(t.strip()) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 999,499, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """Argument type: ``"0.5,1"`` -> ``[0.5, 1.0]``."""
    try:
        return [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"Cannot parse {text!r} as comma-separated numbers.") from err


@contextlib.contextmanager
def user_errors(command: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Report ``errors`` raised inside the block as one line ``<command>: error: <message>`` and exit with 1.

    Args:
        command: The command as typed, e.g. ``"stepdistill eval calc"``.
        errors: Exception types whose message tells the user what to fix (anything else keeps its traceback).

    Example:
        >>> with user_errors("stepdistill train dmd", (ValueError, FileNotFoundError)):
        ...     config = parse_config(DMDConfig, argv)
    """
    try:
        yield
    except errors as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["float_list", "int_list", "number", "number_list", "positive_int", "user_errors"]
