"""The ViT recipe's command line: dense training and its checkpoint, or the pipeline.

    python -m vnm_recipes.vit --epochs 40 [--save DIR]    # dense baseline
    python -m vnm_recipes.vit --preset full --out-dir DIR  # the pruning pipeline

Every flag is checked before the digits are loaded: a bad one exits with status 2 and one
line naming it (`vnm_recipes.checks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Sequence

from vnm_recipes.checks import (ArgumentParser, exit_with_usage_error, finite_float_argument,
                                new_checkpoint_argument, nonnegative_int_argument,
                                output_dir_argument, settings_from_arguments, usage_errors)
from vnm_recipes.data.digits import load_digits_split
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit.checkpoint import save_checkpoint
from vnm_recipes.vit.pipeline import run_pipeline
from vnm_recipes.vit.presets import PRESETS, PipelinePreset
from vnm_recipes.vit.reports import PipelineResult
from vnm_recipes.vit.training import TrainConfig, accuracy, train_dense


# ViTConfig fields set by the digits themselves, not by the command line.
_DATA_FIXED_FIELDS = ("image_size", "channels", "num_classes")
DEFAULT_OUT_DIR = "runs/vit"  # under runs/, which .gitignore lists


def _field_type(default):
  """argparse type of a settings field: ints as ints (>= 0; the settings check the range),
  floats finite."""
  return nonnegative_int_argument if isinstance(default, int) else finite_float_argument


def _parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
  parser = ArgumentParser(prog=prog, description="Train a DeiT-style ViT on the digits.")
  for defaults in (ViTConfig(), TrainConfig()):
    for field in dataclasses.fields(defaults):
      if field.name in _DATA_FIXED_FIELDS:
        continue
      default = getattr(defaults, field.name)
      parser.add_argument(f"--{field.name.replace('_', '-')}", type=_field_type(default),
                          default=default, help=f"(default {default})")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="run the pruning pipeline with this preset (its own sizes; the "
                           "model and training flags above are then not used)")
  parser.add_argument("--save", type=new_checkpoint_argument, default=None, metavar="DIR",
                      help="save the dense model's params here, a new folder (for "
                           "`vnm-jax prune DIR`)")
  parser.add_argument("--out-dir", type=output_dir_argument, default=DEFAULT_OUT_DIR,
                      help="where the pipeline writes its table and plot (default %(default)s; "
                           "a rerun replaces them)")
  args = parser.parse_args(argv)
  with usage_errors(prog):
    args.model_config, args.train_config = _configs_from_args(args)
  return args


def _configs_from_args(args: argparse.Namespace) -> tuple[ViTConfig, TrainConfig]:
  """The settings of the flags, each checked so that an error names its flag."""
  model_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ViTConfig)
                  if f.name not in _DATA_FIXED_FIELDS}
  train_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
  return (settings_from_arguments(ViTConfig, model_fields),
          settings_from_arguments(TrainConfig, train_fields))


def run_and_report(preset: str | PipelinePreset, out_dir: str | os.PathLike) -> PipelineResult:
  """`run_pipeline`, then prints the results table and where the files were written."""
  started = time.perf_counter()
  result = run_pipeline(preset, out_dir)
  print(f"\n{result.to_markdown()}\n")
  print(f"total {time.perf_counter() - started:.0f} s; table: {result.table_path}, "
        f"JSON: {result.json_path}\nplot written to {result.plot_path}")
  return result


def main(argv: Sequence[str] | None = None, prog: str = "python -m vnm_recipes.vit") -> int:
  """Trains the dense baseline and prints its test accuracy, or runs the pipeline (--preset)."""
  args = _parse_args(argv, prog)
  if args.preset is not None:
    run_and_report(args.preset, args.out_dir)
    return 0
  model_config, train_config = args.model_config, args.train_config
  data = load_digits_split()
  if train_config.batch_size > len(data.train_images):
    exit_with_usage_error(prog, f"argument --batch-size: must be at most the "
                                f"{len(data.train_images)} training images, got "
                                f"{train_config.batch_size}")
  cpu_start = time.process_time()
  graphdef, params, result = train_dense(model_config, train_config, data)
  test_accuracy = accuracy(graphdef, params, data.test_images, data.test_labels)
  train_accuracy = accuracy(graphdef, params, data.train_images, data.train_labels)
  print(f"dense ViT {model_config}\n  {train_config}\n"
        f"  final loss {result.epoch_losses[-1]:.4f}  train acc {100 * train_accuracy:.2f} %  "
        f"test acc {100 * test_accuracy:.2f} %  wall {result.seconds:.1f} s  "
        f"process CPU {time.process_time() - cpu_start:.1f} s")
  if args.save is not None:
    save_checkpoint(args.save, model_config, params)
    print(f"params saved to {args.save}")
  return 0
