"""Checks shared by the recipes: of settings values, and argparse types for the command lines.

A setting that is not a positive int raises a ValueError naming it
(:func:`check_positive_int`); an argparse type raises ``ArgumentTypeError``, so a bad
command-line value exits with status 2 and a message naming the argument.
"""

from __future__ import annotations

import argparse

from vnm_jax import VNMConfig


def check_positive_int(name: str, value) -> int:
  """``value`` if it is an int >= 1 (not a bool); else a ValueError naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def check_positive_ints(settings, names) -> None:
  """:func:`check_positive_int` of every field in ``names`` of a settings dataclass."""
  for name in names:
    check_positive_int(f"{type(settings).__name__}.{name}", getattr(settings, name))


def config_argument(text: str) -> VNMConfig:
  """argparse type: a V:N:M config such as "64:2:8" (or "2:4")."""
  try:
    return VNMConfig.parse(text)
  except (TypeError, ValueError) as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def positive_float_argument(text: str) -> float:
  """argparse type: a number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
  return value


def positive_int_argument(text: str) -> int:
  """argparse type: an int >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
  return value
