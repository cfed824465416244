"""The ViT recipe's command line: dense training and its checkpoint, or the pipeline.

    python -m vnm_recipes.vit --epochs 40 [--save DIR]          # dense baseline, digits
    python -m vnm_recipes.vit --dataset fashion_mnist --patch-size 7 --batch-size 128
    python -m vnm_recipes.vit --preset full --out-dir DIR        # the pipeline, 3 seeds
    python -m vnm_recipes.vit --preset full --seeds 1 --out-dir DIR   # one seed per chunk
    python -m vnm_recipes.vit --preset full --resume --out-dir DIR    # after an interruption

Every flag is checked before any data is loaded (Fashion-MNIST's files are looked for
first): a bad one exits with status 2 and one line naming it (`vnm_recipes.checks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Sequence

from vnm_recipes.checks import (ArgumentParser, BadArgument, choice_argument,
                                comma_list_argument, exit_with_usage_error, existing_dir_argument,
                                finite_float_argument, new_checkpoint_argument,
                                nonnegative_int_argument, output_dir_argument,
                                settings_from_arguments, usage_errors)
from vnm_recipes.data import fashion_mnist
from vnm_recipes.data.images import DATASETS, load_image_dataset
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit.checkpoint import save_checkpoint
from vnm_recipes.vit.pipeline import run_pipeline
from vnm_recipes.vit.presets import PRESETS, PipelinePreset
from vnm_recipes.vit.reports import PipelineResult
from vnm_recipes.vit.training import TrainConfig, accuracy, train_dense


# ViTConfig fields set by the data set, not by the command line.
_DATA_FIXED_FIELDS = ("image_size", "channels", "num_classes")
DATA_SHAPES = {"digits": dict(image_size=8, channels=1, num_classes=10),
               "fashion_mnist": dict(image_size=28, channels=1, num_classes=10)}
TRAIN_IMAGES = {"digits": 1437, "fashion_mnist": 60000}  # sizes of the fixed splits
DEFAULT_OUT_DIR = "runs/vit"  # under runs/, which .gitignore lists


def _field_type(default):
  """argparse type of a settings field: ints as ints (>= 0; the settings check the range),
  floats finite."""
  return nonnegative_int_argument if isinstance(default, int) else finite_float_argument


def _parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
  parser = ArgumentParser(prog=prog, description="Train a DeiT-style ViT on the digits or "
                                                 "Fashion-MNIST, or run its pruning pipeline.")
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
  parser.add_argument("--dataset", type=choice_argument(DATASETS), default=None,
                      help="data set of the dense training (default digits; a preset names "
                           "its own)")
  parser.add_argument("--data-dir", type=existing_dir_argument, default=None, metavar="DIR",
                      help="folder holding Fashion-MNIST's idx files (looked in first, then "
                           f"{fashion_mnist.DEBIAN_DIR}, where `apt-get install "
                           "dataset-fashion-mnist` puts them)")
  parser.add_argument("--seeds", type=comma_list_argument(nonnegative_int_argument),
                      default=None, metavar="S,S,...",
                      help="with --preset: the seeds to run (default the preset's, e.g. "
                           "0,1,2); the table covers every seed saved in --out-dir")
  parser.add_argument("--resume", action="store_true",
                      help="with --preset: skip the seeds already saved in --out-dir with the "
                           "same settings")
  parser.add_argument("--save", type=new_checkpoint_argument, default=None, metavar="DIR",
                      help="save the dense model's params here, a new folder (for "
                           "`vnm-jax prune DIR`)")
  parser.add_argument("--out-dir", type=output_dir_argument, default=DEFAULT_OUT_DIR,
                      help="where the pipeline writes its table and plot (default %(default)s; "
                           "a rerun replaces them)")
  args = parser.parse_args(argv)
  with usage_errors(prog):
    if args.preset is None and (args.seeds is not None or args.resume):
      raise BadArgument("--seeds" if args.seeds is not None else "--resume",
                        "needs --preset (the dense training takes --seed)")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
      raise BadArgument("--seeds", f"must be distinct, got {','.join(map(str, args.seeds))}")
    if args.preset is not None and args.dataset is not None:
      raise BadArgument("--dataset", f"cannot be combined with --preset (preset "
                                     f"{args.preset!r} uses {PRESETS[args.preset].dataset!r})")
    args.dataset = PRESETS[args.preset].dataset if args.preset else args.dataset or "digits"
    args.model_config, args.train_config = _configs_from_args(args)
    if args.dataset == "fashion_mnist":
      try:  # before any training: a missing file is a usage error, not a traceback later
        fashion_mnist.find_files(args.data_dir)
      except FileNotFoundError as error:
        raise BadArgument("--data-dir", str(error)) from None
  return args


def _configs_from_args(args: argparse.Namespace) -> tuple[ViTConfig, TrainConfig]:
  """The settings of the flags, each checked so that an error names its flag."""
  model_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ViTConfig)
                  if f.name not in _DATA_FIXED_FIELDS}
  model_fields.update(DATA_SHAPES[args.dataset])
  train_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
  return (settings_from_arguments(ViTConfig, model_fields),
          settings_from_arguments(TrainConfig, train_fields))


def run_and_report(preset: str | PipelinePreset, out_dir: str | os.PathLike, *,
                   seeds: Sequence[int] | None = None, resume: bool = False,
                   data_dir: str | os.PathLike | None = None) -> PipelineResult:
  """`run_pipeline`, then prints the results table and where the files were written."""
  started = time.perf_counter()
  result = run_pipeline(preset, out_dir, seeds=seeds, resume=resume, data_dir=data_dir)
  print(f"\n{result.to_markdown()}\n")
  print(f"total {time.perf_counter() - started:.0f} s; table: {result.table_path}, "
        f"JSON: {result.json_path}\nplot written to {result.plot_path}")
  return result


def main(argv: Sequence[str] | None = None, prog: str = "python -m vnm_recipes.vit") -> int:
  """Trains the dense baseline and prints its test accuracy, or runs the pipeline (--preset)."""
  args = _parse_args(argv, prog)
  if args.preset is not None:
    run_and_report(args.preset, args.out_dir, seeds=args.seeds, resume=args.resume,
                   data_dir=args.data_dir)
    return 0
  model_config, train_config = args.model_config, args.train_config
  train_images = TRAIN_IMAGES[args.dataset]
  if train_config.batch_size > train_images:  # checked before the data are read
    exit_with_usage_error(prog, f"argument --batch-size: must be at most the {train_images} "
                                f"training images, got {train_config.batch_size}")
  data = load_image_dataset(args.dataset, args.data_dir)
  cpu_start = time.process_time()
  graphdef, params, result = train_dense(model_config, train_config, data)
  test_accuracy = accuracy(graphdef, params, data.test_images, data.test_labels)
  train_accuracy = accuracy(graphdef, params, data.train_images, data.train_labels)
  print(f"dense ViT {model_config}\n  {train_config}\n"
        f"  final loss {result.epoch_losses[-1]:.4f}  train acc {100 * train_accuracy:.2f} %  "
        f"test acc {100 * test_accuracy:.2f} %  wall {result.seconds:.1f} s  "
        f"process CPU {time.process_time() - cpu_start:.1f} s")
  if args.save is not None:
    save_checkpoint(args.save, model_config, params, dataset=args.dataset)
    print(f"params saved to {args.save}")
  return 0
