"""Checks shared by the recipes: of settings values, and of command-line arguments.

A setting that is not a positive int raises a ValueError naming it
(:func:`check_positive_int`). The command lines check every argument before loading a
model or timing anything, and a bad one exits with status 2 and ONE line naming the
argument, the value and what is allowed:

- build the parser with :class:`ArgumentParser` (one-line errors, exit 2; its
  subparsers inherit it) and give each option one of the ``*_argument`` types below
  (they raise ``argparse.ArgumentTypeError``; argparse names the option);
- a check that needs several arguments or a file's contents raises
  :class:`BadArgument` (``BadArgument("--eval-tokens", "must be in [512, 20480], got 9")``)
  inside ``with usage_errors(prog):``, which prints it as argparse would and exits 2;
- settings dataclasses are built with :func:`settings_from_arguments`, which checks each
  field alone first so that the error names its option.

The program name in messages is the one the user typed: every ``main(argv, prog=...)``
passes ``prog`` on (``vnm-jax llm`` under ``vnm-jax``, ``python -m vnm_recipes.llm`` alone).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pathlib
import re
import sys
from typing import Callable, Iterator, Sequence

from vnm_jax import Importance, VNMConfig

SCORES = tuple(score.value for score in Importance)  # choices of a --score option


def check_positive_int(name: str, value) -> int:
  """``value`` if it is an int >= 1 (not a bool); else a ValueError naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def check_positive_ints(settings, names) -> None:
  """:func:`check_positive_int` of every field in ``names`` of a settings dataclass."""
  for name in names:
    check_positive_int(f"{type(settings).__name__}.{name}", getattr(settings, name))


# ----------------------------------------------------------------------------- parser and errors

def exit_with_usage_error(prog: str, message: str):
  """Prints ``prog: error: message`` (one line) to stderr and exits with status 2."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser with a one-line error (``prog: error: message``, exit status 2).

  argparse prints the whole usage block before an error; one line naming the argument
  is what the README promises (``--help`` still prints the usage).
  """

  def error(self, message: str):
    exit_with_usage_error(self.prog, message)

  def parse_args(self, args=None, namespace=None):
    # argparse reports a subcommand's unknown option as the top parser's; name the
    # subcommand the user typed instead.
    parsed, extra = self.parse_known_args(args, namespace)
    if extra:
      parser = self
      for action in self._actions:
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
          parser = action.choices.get(getattr(parsed, action.dest, None), self)
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return parsed


class BadArgument(ValueError):
  """A command-line argument found bad after parsing (it needs a file or other arguments)."""

  def __init__(self, argument: str, message: str):
    super().__init__(f"argument {argument}: {message}")
    self.argument = argument


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
  """Turns a :class:`BadArgument` raised inside into ``prog: error: ...`` and exit status 2."""
  try:
    yield
  except BadArgument as error:
    exit_with_usage_error(prog, str(error))


def settings_from_arguments(cls, values: dict, options: dict[str, str] | None = None):
  """``cls(**values)`` for a settings dataclass whose fields came from command-line options.

  Each field is first checked alone (the others at their defaults), so a bad value raises
  :class:`BadArgument` naming its option; a rule between fields names all their options.

  Args:
    cls: a dataclass that checks its fields in ``__post_init__`` (ValueError/TypeError).
    values: {field name: value}.
    options: {field name: option}; default ``--field-name``.
  """
  option = lambda name: (options or {}).get(name, "--" + name.replace("_", "-"))  # noqa: E731
  defaults = cls()
  for name, value in values.items():
    try:
      dataclasses.replace(defaults, **{name: value})
    except (TypeError, ValueError) as error:
      raise BadArgument(option(name), str(error)) from None
  try:
    return cls(**{**dataclasses.asdict(defaults), **values})
  except (TypeError, ValueError) as error:
    named = ([option(name) for name in values if re.search(rf"\b{name}\b", str(error))]
             or map(option, values))
    raise BadArgument("/".join(named), str(error)) from None


# ----------------------------------------------------------------------------- numbers and lists

def _number(text: str, kind: type, allowed: str):
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
  return value


def positive_int_argument(text: str) -> int:
  """argparse type: an int >= 1."""
  value = _number(text, int, "an int >= 1")
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
  return value


def nonnegative_int_argument(text: str) -> int:
  """argparse type: an int >= 0 (e.g. a seed)."""
  value = _number(text, int, "an int >= 0")
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
  return value


def finite_float_argument(text: str) -> float:
  """argparse type: a finite number (its range is checked by the settings it goes into)."""
  return _number(text, float, "a finite number")


def positive_float_argument(text: str) -> float:
  """argparse type: a finite number > 0."""
  value = _number(text, float, "a finite number > 0")
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
  return value


def nonnegative_float_argument(text: str) -> float:
  """argparse type: a finite number >= 0."""
  value = _number(text, float, "a finite number >= 0")
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
  return value


def nonempty_text_argument(text: str) -> str:
  """argparse type: a string with a non-space character (e.g. a prompt)."""
  if not text.strip():
    raise argparse.ArgumentTypeError(f"expected a non-empty text, got {text!r}")
  return text


def config_argument(text: str) -> VNMConfig:
  """argparse type: a V:N:M config such as "64:2:8" (or "2:4")."""
  try:
    return VNMConfig.parse(text)
  except (TypeError, ValueError) as error:
    raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def comma_list_argument(item: Callable[[str], object]) -> Callable[[str], list]:
  """argparse type: a non-empty comma-separated list, each item converted by ``item``."""

  def parse(text: str) -> list:
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(items):
      raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty "
                                       f"items, got {text!r}")
    return [item(part) for part in items]

  return parse


def choice_argument(choices: Sequence[str]) -> Callable[[str], str]:
  """argparse type: one of ``choices`` (for items of :func:`comma_list_argument`)."""

  def parse(text: str) -> str:
    if text not in choices:
      raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
    return text

  return parse


def shapes_argument(text: str) -> dict[tuple[int, int], int]:
  """argparse type: GEMM shapes "INxOUT,INxOUT,..." -> {(in, out): times mentioned}."""
  shapes: dict[tuple[int, int], int] = {}
  for item in text.split(","):
    try:
      k, n = (int(x) for x in item.strip().lower().split("x"))
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected shapes like 576x1536,1536x576, got "
                                       f"{item!r} in {text!r}") from None
    if k < 1 or n < 1:
      raise argparse.ArgumentTypeError(f"expected shapes of positive sizes, got {item!r}")
    shapes[(k, n)] = shapes.get((k, n), 0) + 1
  return shapes


# ----------------------------------------------------------------------------- files

def existing_file_argument(text: str) -> pathlib.Path:
  """argparse type: a readable file."""
  path = pathlib.Path(text)
  if not path.exists():
    raise argparse.ArgumentTypeError(f"{text!r} does not exist")
  if not path.is_file():
    raise argparse.ArgumentTypeError(f"{text!r} is not a file")
  if not os.access(path, os.R_OK):
    raise argparse.ArgumentTypeError(f"{text!r} is not readable")
  return path


def existing_dir_argument(text: str) -> pathlib.Path:
  """argparse type: a readable folder (added for the ViT recipe's --data-dir, issue 13)."""
  path = pathlib.Path(text)
  if not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is not a folder" if path.exists()
                                     else f"{text!r} does not exist")
  if not os.access(path, os.R_OK | os.X_OK):
    raise argparse.ArgumentTypeError(f"{text!r} is not readable")
  return path


def gguf_argument(text: str) -> pathlib.Path:
  """argparse type: a readable GGUF file (its header is read: magic and version)."""
  from vnm_recipes.gguf import check_gguf_file

  path = existing_file_argument(text)
  try:
    check_gguf_file(path)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  return path


def _check_creatable(path: pathlib.Path, text: str) -> None:
  """The nearest existing folder above ``path`` is a writable folder."""
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(parent)!r} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(parent)!r} is not "
                                     f"writable")


def output_file_argument(text: str) -> pathlib.Path:
  """argparse type: a file to write or append to (an existing one is not a folder)."""
  path = pathlib.Path(text)
  if path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file")
  if path.exists() and not os.access(path, os.W_OK):
    raise argparse.ArgumentTypeError(f"{text!r} is not writable")
  _check_creatable(path, text)
  return path


def new_file_argument(suffix: str | None = None) -> Callable[[str], pathlib.Path]:
  """argparse type: a file that does not exist yet (a result is never overwritten)."""

  def parse(text: str) -> pathlib.Path:
    path = pathlib.Path(text)
    if suffix is not None and path.suffix != suffix:
      raise argparse.ArgumentTypeError(f"expected a {suffix} file name, got {text!r}")
    if path.exists():
      raise argparse.ArgumentTypeError(f"{text!r} already exists; choose a new name")
    _check_creatable(path, text)
    return path

  return parse


def output_dir_argument(text: str) -> pathlib.Path:
  """argparse type: a writable folder, or one that can be created."""
  path = pathlib.Path(text)
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text!r} is a file, expected a folder")
  if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
    raise argparse.ArgumentTypeError(f"{text!r} is not writable")
  _check_creatable(path, text)
  return path


def new_checkpoint_argument(text: str) -> pathlib.Path:
  """argparse type: a checkpoint folder to write step 0 into: no file, no saved step there."""
  from vnm_jax.checkpoint import saved_steps

  path = output_dir_argument(text)
  steps = saved_steps(path) if path.is_dir() else []
  if steps:
    raise argparse.ArgumentTypeError(f"{text!r} already holds checkpoint steps {steps}; "
                                     f"choose a new folder")
  return path


def regex_argument(text: str) -> str:
  """argparse type: a valid regular expression (kept as text)."""
  try:
    re.compile(text)
  except re.error as error:
    raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {error}") from None
  return text


def default_gguf() -> pathlib.Path:
  """The SmolLM2 GGUF file of an omitted ``--gguf`` (header read), else :class:`BadArgument`."""
  from vnm_recipes.gguf import (SMOLLM2_GGUF_ENV, check_gguf_file, default_cache_dir,
                                find_smollm2_gguf)

  from_env = os.environ.get(SMOLLM2_GGUF_ENV)
  try:
    path = find_smollm2_gguf()
  except FileNotFoundError:
    where = (f"${SMOLLM2_GGUF_ENV}={from_env!r} is not a file" if from_env else
             f"there is no SmolLM2 GGUF in {str(default_cache_dir())!r}")
    raise BadArgument("--gguf", f"not given, and {where}; get SmolLM2 once with `python -m "
                                f"vnm_recipes.llm fetch` or pass --gguf FILE") from None
  try:
    return check_gguf_file(path)
  except ValueError as error:
    raise BadArgument("--gguf", f"not given, and the default {error}") from None
