"""The ``vnm-jax`` command line (the console script of the package; it may import both
the library ``vnm_jax`` and the recipes).

Subcommands::

    vnm-jax demo     # dense ViT on the digits, then 64:2:5 / 64:2:8 pruning and fine-tuning
                     # ("short" preset of vnm_recipes.vit): a table and an accuracy/speedup plot
    vnm-jax vit      # vnm_recipes.vit: dense training (--epochs ...) or the pipeline (--preset)
    vnm-jax llm      # vnm_recipes.llm: SmolLM2 one-shot pruning grid and three-stage LoRA
    vnm-jax bench    # vnm_recipes.speed: dense vs V:N:M matmul timings on this device
    vnm-jax select   # pick V and M: the most diverse pattern meeting a measured speedup
    vnm-jax prune    # one-shot prune a checkpoint or a GGUF model, save sparse + compressed

``vit``, ``llm``, ``bench`` and ``select`` hand their arguments to their own parsers
(``vnm-jax vit --help`` shows them). A bad argument or a missing file exits with status
2 and a message naming the argument.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Callable, NamedTuple, Sequence

from vnm_recipes.checks import (SCORES, ArgumentParser, BadArgument, config_argument,
                                new_checkpoint_argument, output_dir_argument,
                                positive_float_argument, positive_int_argument, regex_argument,
                                usage_errors)

CALIBRATION_BATCH = 256  # digits images per calibration batch
DEMO_OUT_DIR = "runs/demo"  # under runs/, which .gitignore lists


def prune_source_argument(text: str) -> pathlib.Path:
  """argparse type: a checkpoint folder (with a saved step) or a GGUF file (header read)."""
  from vnm_jax.checkpoint import saved_steps
  from vnm_recipes.checks import gguf_argument

  path = pathlib.Path(text)
  if not path.exists():
    raise argparse.ArgumentTypeError(f"{text!r} does not exist")
  if path.is_dir():
    if not saved_steps(path):
      raise argparse.ArgumentTypeError(
          f"{text!r} holds no checkpoint step; expected a folder written by `vnm-jax vit "
          f"--save DIR` or a .gguf file")
    return path
  if path.suffix != ".gguf":
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a checkpoint folder (written by `vnm-jax vit --save DIR`) "
        f"nor a .gguf file")
  return gguf_argument(text)


# ----------------------------------------------------------------------------- delegated commands

def _run_vit(argv: Sequence[str]) -> int:
  from vnm_recipes.vit import cli
  return cli.main(list(argv), prog="vnm-jax vit")


def _run_llm(argv: Sequence[str]) -> int:
  from vnm_recipes.llm import cli
  return cli.main(list(argv), prog="vnm-jax llm")


def _run_select(argv: Sequence[str]) -> int:
  from vnm_recipes import speed
  return speed.select_main(list(argv))


def _run_bench(argv: Sequence[str]) -> int:
  from vnm_recipes import speed
  return speed.bench_main(list(argv))


DELEGATED: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "vit": (_run_vit, "train the digits ViT or run its pruning pipeline (vnm_recipes.vit)"),
    "llm": (_run_llm, "SmolLM2 pruning and three-stage LoRA (vnm_recipes.llm)"),
    "bench": (_run_bench, "dense vs V:N:M matmul timings on this device (vnm_recipes.speed)"),
    "select": (_run_select, "choose V and M from speedups measured on this device"),
}


# ----------------------------------------------------------------------------- demo

def _run_demo(args: argparse.Namespace) -> int:
  from vnm_recipes.vit import cli
  cli.run_and_report(args.preset, args.out_dir)
  return 0


# ----------------------------------------------------------------------------- prune

class _Source(NamedTuple):
  """A model to prune, described without loading its weights."""
  paths: list[str]  # its parameters' path strings
  pattern: str  # the regex of its prunable kernels
  load: Callable[[], tuple]  # () -> (model, calibration batches)


def _abstract_paths(make) -> list[str]:
  import jax
  from flax import nnx

  from vnm_jax import path_str
  state = nnx.state(nnx.eval_shape(make), nnx.Param)
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _vit_source(directory: pathlib.Path) -> _Source:
  """A `vnm-jax vit --save` checkpoint: its config from the metadata, the digits to calibrate."""
  import jax.numpy as jnp
  from flax import nnx

  from vnm_jax import Checkpointer, CheckpointError
  from vnm_recipes.data.digits import load_digits_split
  from vnm_recipes.models.vit import PRUNABLE_PATTERN, ViT, ViTConfig
  from vnm_recipes.vit.checkpoint import load_checkpoint

  try:
    with Checkpointer(directory) as checkpointer:
      metadata = checkpointer.metadata()
    if metadata.get("model") != "vit":
      raise ValueError(f"its metadata names model {metadata.get('model')!r}, not 'vit'")
    model_config = ViTConfig(**metadata["vit_config"])
  except (CheckpointError, ValueError, TypeError, KeyError) as error:
    raise BadArgument("source", f"{str(directory)!r} is not a ViT checkpoint written by "
                                f"`vnm-jax vit --save DIR`: {error}") from None

  def load():
    try:
      graphdef, params = load_checkpoint(directory)
    except (FileNotFoundError, ValueError) as error:
      raise BadArgument("source", f"cannot load {str(directory)!r}: {error}") from None
    images = load_digits_split().train_images
    batches = [jnp.asarray(images[i:i + CALIBRATION_BATCH])
               for i in range(0, len(images), CALIBRATION_BATCH)]
    return nnx.merge(graphdef, params), batches

  paths = _abstract_paths(lambda: ViT(model_config, rngs=nnx.Rngs(0)))
  return _Source(paths, PRUNABLE_PATTERN, load)


def _gguf_source(path: pathlib.Path, windows: int, needs_calibration: bool) -> _Source:
  """A Llama GGUF file: its config and tokenizer read, the calibration windows cut."""
  import jax.numpy as jnp
  from flax import nnx

  from vnm_recipes.data.text import WINDOW, calibration_batches, split_pydoc_topics
  from vnm_recipes.gguf import load_llama, load_tokenizer, open_gguf, read_llama_config
  from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama

  try:
    reader = open_gguf(path)
    config = read_llama_config(reader)
    tokenizer = load_tokenizer(reader)
  except ValueError as error:
    raise BadArgument("source", f"GGUF file {str(path)!r}: {error}") from None
  batches = []
  if needs_calibration:
    try:
      batches = calibration_batches(split_pydoc_topics(tokenizer).train, windows, WINDOW,
                                    batch_size=2)
    except ValueError as error:
      raise BadArgument("--calibration-windows", str(error)) from None

  def load():
    try:
      model, _ = load_llama(path, reader=reader)
    except ValueError as error:
      raise BadArgument("source", str(error)) from None
    return model, [jnp.asarray(b) for b in batches]

  return _Source(_abstract_paths(lambda: Llama(config, rngs=nnx.Rngs(0))), PRUNABLE_PATTERN,
                 load)


def _run_prune(args: argparse.Namespace) -> int:
  import jax
  from flax import nnx
  from tqdm.auto import tqdm

  from vnm_jax import (Checkpointer, Importance, collect_input_norms, compress, kernel_scores,
                       leaves_by_path, path_str, tree_apply_masks, tree_configs, tree_masks,
                       tree_permutations)
  from vnm_jax.trees import sparsity_summary

  source = args.source
  needs_norms = Importance.parse(args.score).needs_input_norms
  if source.is_dir():
    described = _vit_source(source)
  else:
    described = _gguf_source(source, args.calibration_windows, needs_norms)
  pattern = args.filter or described.pattern
  if not any(re.search(pattern, path) for path in described.paths):
    raise BadArgument("--filter", f"{pattern!r} matches no parameter; the model's parameters "
                                  f"are e.g. {described.paths[:4]}")
  model, batches = described.load()
  params = nnx.state(model, nnx.Param)
  input_norms = None
  if needs_norms:
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
  masks_by_path = leaves_by_path(masks)
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
  parser = ArgumentParser(prog="vnm-jax", description="V:N:M sparsity for JAX models.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  demo = commands.add_parser(
      "demo", help="train a digits ViT, prune it to 64:2:5 and 64:2:8, fine-tune, plot",
      description="Dense ViT on scikit-learn's digits, then 64:2:5 and 64:2:8 pruning with "
                  "and without permutation (one-shot, fixed-mask fine-tuning, SR-STE); prints "
                  "the table and writes it with a plot of accuracy against the GEMM speedup "
                  "measured on this machine. A few minutes on 2 CPU cores.")
  demo.add_argument("--out-dir", type=output_dir_argument, default=DEMO_OUT_DIR,
                    help="where the table and plot are written (default %(default)s; a rerun "
                         "replaces them)")
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
  prune.add_argument("--out", type=new_checkpoint_argument, required=True,
                     help="orbax checkpoint folder to write (new, or without saved steps)")
  prune.add_argument("--score", choices=SCORES,
                     default="magnitude", help="importance score (default %(default)s)")
  prune.add_argument("--rule", choices=("column_l1", "exhaustive"), default="column_l1",
                     help="how each block picks its 4 columns (default %(default)s)")
  prune.add_argument("--permute", action="store_true",
                     help="search input/output channel permutations before pruning")
  prune.add_argument("--permutation-seconds", type=positive_float_argument, default=2.0,
                     help="time budget of each kernel's permutation search (default 2)")
  prune.add_argument("--filter", type=regex_argument, default=None,
                     help="regex of the kernel paths to prune (default: the model's block "
                          "projections)")
  prune.add_argument("--calibration-windows", type=positive_int_argument, default=8,
                     help="512-token windows for wanda/ria input norms of a GGUF model "
                          "(default 8; a ViT uses the digits' training images)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one ``vnm-jax`` subcommand; returns its exit status (2: a bad argument)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # The scripts parse their own arguments (argparse's REMAINDER drops a leading "--x").
  if argv and argv[0] in DELEGATED:
    run, _ = DELEGATED[argv[0]]
    return run(argv[1:]) or 0
  parser = build_parser()
  args = parser.parse_args(argv)
  run = {"demo": _run_demo, "prune": _run_prune}[args.command]
  with usage_errors(f"vnm-jax {args.command}"):
    return run(args)


if __name__ == "__main__":
  raise SystemExit(main())
