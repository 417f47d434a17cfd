"""Checks of config fields, shared by every config dataclass's ``__post_init__``: one clear line naming the field
and the value (``ModelConfig.d_model must be a positive int; got 0``). At the bottom of the layers so that every
config can use them; nothing here imports JAX."""

from __future__ import annotations

import math
import numbers


def _name(owner: str, name: str) -> str:
  return f"{owner}.{name}" if owner else name


def integer(owner: str, name: str, value, *, minimum: int | None = 1, allow_none: bool = False) -> None:
  """An int (not a bool) >= ``minimum`` (default: positive)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{_name(owner, name)} must be an int; got {value!r}")
  if minimum is not None and value < minimum:
    what = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
    raise ValueError(f"{_name(owner, name)} must be {what}; got {value!r}")


def number(owner: str, name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
  """A finite real number (not a bool) in the given range."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{_name(owner, name)} must be a finite number; got {value!r}")
  lo_bad = low is not None and (value <= low if low_open else value < low)
  hi_bad = high is not None and (value >= high if high_open else value > high)
  if lo_bad or hi_bad:
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    rng = f"in {lo or '(-inf'}, {hi or 'inf)'}"
    raise ValueError(f"{_name(owner, name)} must be {rng}; got {value!r}")


def boolean(owner: str, name: str, value) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{_name(owner, name)} must be True or False; got {value!r}")


def choice(owner: str, name: str, value, options) -> None:
  if not isinstance(value, str) or value not in options:
    raise ValueError(f"{_name(owner, name)} must be one of {tuple(options)}; got {value!r}")


def string(owner: str, name: str, value, *, allow_none: bool = False, allow_empty: bool = False) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, str) or (not allow_empty and not value.strip()):
    raise ValueError(f"{_name(owner, name)} must be a non-empty string; got {value!r}")


def int_tuple(owner: str, name: str, value, *, minimum: int = 1) -> tuple:
  """A tuple/list of ints >= ``minimum`` (a single int means a 1-tuple), returned as a tuple."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    value = (value,)
  if not isinstance(value, (tuple, list)):
    raise ValueError(f"{_name(owner, name)} must be a tuple of ints; got {value!r}")
  for v in value:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
      raise ValueError(f"{_name(owner, name)} must hold ints >= {minimum}; got {tuple(value)!r}")
  return tuple(value)


def paths(owner: str, name: str, value) -> tuple[str, ...]:
  """A tuple of path strings; a single string is one path (never split into characters)."""
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) and p for p in value):
    raise ValueError(f"{_name(owner, name)} must be a path or a tuple of paths; got {value!r}")
  return tuple(value)
