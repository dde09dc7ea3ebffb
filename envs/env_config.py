"""Checks shared by the envs' configuration dataclasses, and their keyword overrides.

Every check raises ``ValueError`` naming the field, the allowed values and the value
given, so that a bad ``gym.make(..., field=value)`` says what to change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import numpy as np

Config = TypeVar("Config")


def is_finite_number(value: Any) -> bool:
    """A real, finite number (booleans excluded)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if high is None:
        if not (is_int and value >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        return
    if not is_int:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    optional: bool = False,
    low_open: bool = True,
) -> None:
    """A finite number above ``low`` (or at it, when not ``low_open``) and at most ``high``."""
    if value is None and optional:
        return
    ok = is_finite_number(value) and (value > low if low_open else value >= low)
    if ok and value <= high:
        return
    none = " or None" if optional else ""
    if math.isinf(high):
        bound = f"a finite number > {low}" if low_open else f"a number >= {low}"
    else:
        bound = f"a number in {'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{name} must be {bound}{none}, got {value!r}")


def config_from_kwargs(cls: type[Config], label: str, base: Config | None = None, **overrides):
    """``base`` (or the defaults) with fields replaced by ``overrides``.

    Lists become tuples, so values read from YAML or JSON work as tuple fields.

    Raises:
        ValueError: naming unknown fields and listing the allowed ones, a ``base`` of
            another type, or (from the dataclass's own checks) a bad value.
    """
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {label} option(s) {unknown}; allowed: {allowed}")
    base = base if base is not None else cls()
    if not isinstance(base, cls):
        raise ValueError(f"config must be a {cls.__name__}, got {type(base).__name__}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, **overrides)
