"""argparse types shared by the recipes' command lines: a bad value exits with status 2."""

from __future__ import annotations

import argparse

from vnm_jax import VNMConfig


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
