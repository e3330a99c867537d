"""Field checks for the config dataclasses' `__post_init__`: one wording for every "must be" message.

Each checker raises the error type it is given (`ConfigError` unless told otherwise; `SamplingConfig` passes
`SamplingError`) with a message that starts with the field's name, says what the field must be and shows
the value: "n_layer must be a positive integer, got 0". The CLI relies on that first word to name the flag
(`edgegpt.cli_support`).

An integer is an int or a numpy integer, never a bool; a number is a finite int or float (numpy's too),
never a bool; a flag is a bool or a numpy bool. Stdlib only: numpy is looked up, never imported.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable
from typing import Any

from edgegpt.errors import ConfigError

__all__ = ["check_bool", "check_choice", "check_int", "check_real"]


def check_int(
    name: str,
    value: Any,
    *,
    low: int = 0,
    high: int | None = None,
    optional: bool = False,
    error: type[Exception] = ConfigError,
) -> None:
    """Raise `error` unless `value` is an integer in [low, high] (or None, when `optional`).

    >>> check_int("n_layer", 0, low=1)
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConfigError: n_layer must be a positive integer, got 0
    """
    if value is None and optional:
        return
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if integer and value >= low and (high is None or value <= high):
        return
    what = (
        f"an integer in {low}..{high}"
        if high is not None
        else "a positive integer"
        if low == 1
        else f"an integer >= {low}"
    )
    raise error(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = ConfigError,
) -> None:
    """Raise `error` unless `value` is a finite number between `low` and `high` (each end closed unless open).

    >>> check_real("dropout", 1.5, low=0, high=1, high_open=True)
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConfigError: dropout must be in [0, 1), got 1.5
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        if math.isfinite(low) and math.isfinite(high):
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif math.isfinite(low):
            bounds = f"{'>' if low_open else '>='} {low:g}"
        else:
            bounds = f"{'<' if high_open else '<='} {high:g}"
        raise error(f"{name} must be {bounds}, got {value!r}")


def check_bool(name: str, value: Any, *, error: type[Exception] = ConfigError) -> None:
    """Raise `error` unless `value` is true or false (a bool or a numpy bool, not a truthy string)."""
    numpy = sys.modules.get("numpy")  # a numpy bool means numpy is loaded: no need to import it (0.1 s) here
    if not (isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))):
        raise error(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], *, error: type[Exception] = ConfigError) -> None:
    """Raise `error` unless `value` is one of `choices`.

    >>> check_choice("provider", "gpu", ("auto", "cpu", "cuda"))
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConfigError: provider must be one of auto, cpu, cuda, got 'gpu'
    """
    choices = list(choices)
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
