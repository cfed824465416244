"""The ``vnm-jax`` command line.

Subcommands::

    vnm-jax demo     # dense ViT on the digits, then 64:2:5 / 64:2:8 pruning and fine-tuning
                     # ("short" preset of train/vit.py): a table and an accuracy/speedup plot
    vnm-jax vit      # train/vit.py: dense training (--epochs ...) or the pipeline (--preset full)
    vnm-jax llm      # train/llm.py: SmolLM2 one-shot pruning grid and three-stage LoRA
    vnm-jax bench    # bench/kernel.py: dense vs V:N:M matmul timings on this device
    vnm-jax select   # pick V and M: the most diverse pattern meeting a measured speedup
    vnm-jax prune    # one-shot prune a checkpoint or a GGUF model, save sparse + compressed

``vit``, ``llm``, ``bench`` and ``select`` hand their arguments to the scripts' own
parsers (``vnm-jax vit --help`` shows them). A bad argument or a missing file exits with
status 2 and a message naming the argument.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

from vnm_jax.config import VNMConfig

# Kernels `prune` prunes by default, per source model (path regexes for vnm_jax.trees).
VIT_PRUNABLE = r"^blocks/\d+/(attention/(qkv|out)|mlp/fc[12])/kernel$"
LLAMA_PRUNABLE = r"^layers/\d+/(attention|mlp)/\w+_proj/kernel$"
CALIBRATION_BATCH = 256  # digits images per calibration batch
# bench/ is a folder of scripts beside the package, not an installed module.
BENCH_KERNEL = pathlib.Path(__file__).resolve().parent.parent / "bench" / "kernel.py"
SCORES = ("magnitude", "wanda", "ria")  # vnm_jax.scores.Importance values


# ----------------------------------------------------------------------------- argument types

def config_argument(text: str) -> VNMConfig:
  """argparse type: a V:N:M config such as "64:2:8" (or "2:4")."""
  try:
    return VNMConfig.parse(text)
  except (TypeError, ValueError) as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def prune_source_argument(text: str) -> pathlib.Path:
  """argparse type: an existing checkpoint directory or .gguf file."""
  path = pathlib.Path(text)
  if not path.exists():
    raise argparse.ArgumentTypeError(f"{text!r} does not exist")
  if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a checkpoint directory (written by `vnm-jax vit --save DIR`) "
        f"nor a .gguf file")
  return path


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


# ----------------------------------------------------------------------------- delegated commands

def _run_vit(argv: Sequence[str]) -> int:
  from train import vit
  return vit.main(list(argv))


def _run_llm(argv: Sequence[str]) -> int:
  from train import llm
  return llm.main(list(argv))


def _run_select(argv: Sequence[str]) -> int:
  from vnm_jax import selection
  return selection.main(list(argv))


def _run_bench(argv: Sequence[str]) -> int:
  if not BENCH_KERNEL.is_file():
    raise SystemExit(f"vnm-jax bench: {BENCH_KERNEL} not found; `bench` runs from a source "
                     f"checkout (pip install -e .).")
  spec = importlib.util.spec_from_file_location("vnm_jax_bench_kernel", BENCH_KERNEL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(list(argv))
  return 0


DELEGATED: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "vit": (_run_vit, "train the digits ViT or run its pruning pipeline (train/vit.py)"),
    "llm": (_run_llm, "SmolLM2 pruning and three-stage LoRA (train/llm.py)"),
    "bench": (_run_bench, "dense vs V:N:M matmul timings on this device (bench/kernel.py)"),
    "select": (_run_select, "choose V and M from speedups measured on this device"),
}


# ----------------------------------------------------------------------------- demo

def _run_demo(args: argparse.Namespace) -> int:
  from train import vit
  vit.run_and_report(args.preset, args.out_dir)
  return 0


# ----------------------------------------------------------------------------- prune

def _load_vit_checkpoint(directory: pathlib.Path):
  """(model, calibration batches, prunable regex) of a `train.vit --save` checkpoint."""
  import jax.numpy as jnp
  from flax import nnx
  from train import vit

  graphdef, params = vit.load_checkpoint(directory)
  images = vit.load_digits_split().train_images
  batches = [jnp.asarray(images[i:i + CALIBRATION_BATCH])
             for i in range(0, len(images), CALIBRATION_BATCH)]
  return nnx.merge(graphdef, params), batches, VIT_PRUNABLE


def _load_gguf(path: pathlib.Path, windows: int):
  """(model, calibration batches, prunable regex) of a Llama-architecture GGUF file."""
  import jax.numpy as jnp
  from train.llm import calibration_batches
  from vnm_jax.gguf import load_llama
  from vnm_jax.text_data import WINDOW, split_pydoc_topics

  model, tokenizer = load_llama(path)
  split = split_pydoc_topics(tokenizer)
  batches = calibration_batches(split.train, windows, WINDOW, batch_size=2)
  return model, [jnp.asarray(b) for b in batches], LLAMA_PRUNABLE


def _usage_error(message: str) -> int:
  """Prints an argparse-style error for `prune` and returns its exit status, 2."""
  print(f"vnm-jax prune: error: {message}", file=sys.stderr)
  return 2


def _run_prune(args: argparse.Namespace) -> int:
  import jax
  from flax import nnx
  from tqdm.auto import tqdm
  from vnm_jax.calibration import collect_input_norms
  from vnm_jax.checkpoint import Checkpointer
  from vnm_jax.format import compress
  from vnm_jax.permutation_search import tree_permutations
  from vnm_jax.scores import Importance
  from vnm_jax.trees import (kernel_scores, path_str, sparsity_summary, tree_apply_masks,
                             tree_configs, tree_masks)

  source = args.source
  try:
    if source.is_dir():
      model, batches, pattern = _load_vit_checkpoint(source)
    else:
      model, batches, pattern = _load_gguf(source, args.calibration_windows)
  except (FileNotFoundError, ValueError) as error:
    return _usage_error(f"argument source: cannot load {str(source)!r}: {error}")
  pattern = args.filter or pattern
  params = nnx.state(model, nnx.Param)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if not any(re.search(pattern, path) for path in paths):
    return _usage_error(f"argument --filter: {pattern!r} matches no parameter; the model's "
                        f"parameters are e.g. {paths[:4]}")
  input_norms = None
  if Importance.parse(args.score).needs_input_norms:
    input_norms = collect_input_norms(model, batches, filter=pattern)
  scores = kernel_scores(params, args.score, filter=pattern, input_norms=input_norms)
  permutations = None
  if args.permute:
    permutations, table = tree_permutations(params, args.config, filter=pattern, scores=scores,
                                            rule=args.rule,
                                            time_budget_s=args.permutation_seconds)
    print(table)
  masks = tree_masks(params, args.config, filter=pattern, scores=scores, rule=args.rule,
                     permutations=permutations)
  pruned = tree_apply_masks(params, masks)
  print(sparsity_summary(params, masks, tree_configs(params, args.config, filter=pattern)))

  leaves, treedef = jax.tree_util.tree_flatten_with_path(pruned)
  masks_by_path = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}
  compressed = []
  for key_path, leaf in tqdm(leaves, desc="compress"):
    path = path_str(key_path)
    mask = masks_by_path.get(path)
    compressed.append(None if mask is None else compress(
        leaf, args.config, mask=mask, permutation=(permutations or {}).get(path)))
  metadata = {"source": str(source), "config": str(args.config), "score": args.score,
              "rule": args.rule, "permuted": bool(args.permute), "filter": pattern}
  with Checkpointer(args.out) as checkpointer:
    checkpointer.save(0, {"params": pruned, "compressed": treedef.unflatten(compressed)},
                      metadata=metadata)
  print(f"sparse params and compressed weights saved to {args.out} (step 0)")
  return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="vnm-jax", description="V:N:M sparsity for JAX models.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo = commands.add_parser(
      "demo", help="train a digits ViT, prune it to 64:2:5 and 64:2:8, fine-tune, plot",
      description="Dense ViT on scikit-learn's digits, then 64:2:5 and 64:2:8 pruning with "
                  "and without permutation (one-shot, fixed-mask fine-tuning, SR-STE); prints "
                  "the table and writes it with a plot of accuracy against the GEMM speedup "
                  "measured on this machine. A few minutes on 2 CPU cores.")
  demo.add_argument("--out-dir", default="vnm_demo",
                    help="where the table and plot are written (default %(default)s)")
  demo.add_argument("--preset", default="short", choices=("short", "full"),
                    help="pipeline size (default %(default)s)")

  for name, (_, help_text) in DELEGATED.items():
    # Listed for the help only: main hands these commands' arguments to the scripts.
    commands.add_parser(name, help=help_text)

  prune = commands.add_parser(
      "prune", help="one-shot prune a checkpoint or GGUF model and save it with orbax",
      description="One-shot V:N:M pruning of a model's block kernels; prints the per-layer "
                  "sparsity table and saves the sparse params and compressed weights.")
  prune.add_argument("source", type=prune_source_argument,
                     help="a checkpoint directory written by `vnm-jax vit --save DIR`, or a "
                          "Llama-architecture .gguf file (e.g. SmolLM2-135M)")
  prune.add_argument("--config", type=config_argument, required=True,
                     help="V:N:M pattern, e.g. 64:2:8 (2:4 means 64:2:4)")
  prune.add_argument("--out", required=True, help="orbax checkpoint directory to write")
  prune.add_argument("--score", choices=SCORES,
                     default="magnitude", help="importance score (default %(default)s)")
  prune.add_argument("--rule", choices=("column_l1", "exhaustive"), default="column_l1",
                     help="how each block picks its 4 columns (default %(default)s)")
  prune.add_argument("--permute", action="store_true",
                     help="search input/output channel permutations before pruning")
  prune.add_argument("--permutation-seconds", type=positive_float_argument, default=2.0,
                     help="time budget of each kernel's permutation search (default 2)")
  prune.add_argument("--filter", default=None,
                     help="regex of the kernel paths to prune (default: the model's block "
                          "projections)")
  prune.add_argument("--calibration-windows", type=positive_int_argument, default=8,
                     help="512-token windows for wanda/ria input norms of a GGUF model "
                          "(default 8; a ViT uses the digits' training images)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one ``vnm-jax`` subcommand; returns its exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # The scripts parse their own arguments (argparse's REMAINDER drops a leading "--x").
  if argv and argv[0] in DELEGATED:
    run, _ = DELEGATED[argv[0]]
    return run(argv[1:]) or 0
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command == "prune" and args.filter is not None:
    try:
      re.compile(args.filter)
    except re.error as error:
      parser.error(f"argument --filter: invalid regular expression {args.filter!r}: {error}")
  run = {"demo": _run_demo, "prune": _run_prune}[args.command]
  return run(args)


if __name__ == "__main__":
  raise SystemExit(main())
