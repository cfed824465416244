"""Matmul timings and V/M selection on this device, for named models or given GEMM shapes.

The commands ``vnm-jax bench`` and ``vnm-jax select`` (:func:`bench_main`,
:func:`select_main`). Both time GEMMs with the library's
:func:`vnm_jax.measure_matmul_speedup` (dense and V:N:M in the same run); ``select``
then ranks the candidates with :func:`vnm_jax.select_vm`. The GEMM shapes of the
recipes' models are :func:`model_shapes` (the library itself takes shapes as data)::

  vnm-jax bench --model smollm2-135m --tokens 16 256 --configs 64:2:5 64:2:8
  vnm-jax select --model smollm2-135m --tokens 2048 --target 1.3
  vnm-jax select --shapes 576x1536,1536x576 --candidates 64:2:5,64:2:8 --target 1.5

The sweeps over many models, the Pallas layouts and block-size tuning are the
repository's ``bench/kernel.py``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

import vnm_jax
from vnm_jax import VNMConfig
from vnm_jax.selection import format_candidates, rank_candidates
from vnm_recipes.checks import (ArgumentParser, comma_list_argument, config_argument,
                                positive_float_argument, positive_int_argument, shapes_argument)
from vnm_recipes.models.llama import LlamaConfig, llama_gemm_shapes
from vnm_recipes.models.vit import ViT, ViTConfig

MODELS = ("smollm2-135m", "vit-digits")
# Candidates `select` measures by default: Spatha's V and typical M (spec 1).
DEFAULT_CANDIDATES = tuple(f"{v}:2:{m}" for v in (32, 64, 128) for m in (5, 6, 7, 8, 10))
# Configs and token counts `bench` times by default.
DEFAULT_BENCH_CONFIGS = ("2:4", "64:2:5", "64:2:8")
DEFAULT_BENCH_TOKENS = (16, 256)
DTYPES = ("float32", "bfloat16", "float16")


def model_shapes(name: str) -> dict[tuple[int, int], int]:
  """{(in, out): count} of the pruned GEMMs of a recipe model (SmolLM2-135M; the digits ViT)."""
  if name == "smollm2-135m":
    return llama_gemm_shapes(LlamaConfig.smollm2_135m())
  if name == "vit-digits":
    return vnm_jax.model_gemm_shapes(nnx.state(nnx.eval_shape(
        lambda: ViT(ViTConfig(), rngs=nnx.Rngs(0)))))
  raise ValueError(f"--model must be one of {MODELS}, got {name!r}.")


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", choices=MODELS, help="take the GEMM shapes of this model")
  source.add_argument("--shapes", type=shapes_argument,
                      help="GEMM shapes as INxOUT,INxOUT,... (each counted once per mention)")
  parser.add_argument("--dtype", default="float32", choices=DTYPES)
  parser.add_argument("--implementation", default=None, choices=("pallas", "xla"),
                      help="V:N:M matmul path (default: the library's choice)")
  parser.add_argument("--repeats", type=positive_int_argument, default=10,
                      help="timed runs per matmul")


def _print_header(shapes: dict[tuple[int, int], int], tokens, dtype: str) -> None:
  print(f"device: {jax.devices()[0].device_kind}; tokens {tokens}; dtype {dtype}")
  print("GEMM shapes (in x out: count): "
        + ", ".join(f"{k}x{n}: {c}" for (k, n), c in sorted(shapes.items())))


def select_main(argv: Sequence[str] | None = None) -> int:
  """``select``: measure the candidates on this device and print the table and the choice."""
  parser = ArgumentParser(
      prog="vnm-jax select",
      description="Pick V and M: the most diverse V:N:M pattern whose measured speedup "
                  "over dense, on this device and for the model's GEMM shapes, meets the "
                  "target.")
  _add_source_arguments(parser)
  parser.add_argument("--candidates", type=comma_list_argument(config_argument),
                      default=",".join(DEFAULT_CANDIDATES),
                      help="comma-separated V:N:M configs (default: %(default)s)")
  parser.add_argument("--target", type=positive_float_argument, required=True,
                      help="required speedup over dense (a number > 0), e.g. 1.5")
  parser.add_argument("--tokens", type=positive_int_argument, default=2048,
                      help="activation rows (default 2048)")
  args = parser.parse_args(argv)
  shapes = model_shapes(args.model) if args.model else args.shapes
  _print_header(shapes, args.tokens, args.dtype)
  speedups = vnm_jax.measure_speedups(shapes, args.candidates, args.tokens,
                                      dtype=jnp.dtype(args.dtype),
                                      implementation=args.implementation, repeats=args.repeats)
  ranked = rank_candidates(speedups, args.target)
  try:
    choice = vnm_jax.select_vm(speedups, args.target)
  except ValueError as error:
    print(format_candidates(ranked, args.target))
    print(f"no choice: {error}")
    return 1
  print(format_candidates(ranked, args.target, choice))
  print(f"choice: {choice[0]}:2:{choice[1]}")
  return 0


def bench_table(timings: Sequence[vnm_jax.MatmulTiming]) -> str:
  """A markdown table of matmul timings (as from :func:`vnm_jax.measure_matmul_speedup`)."""
  lines = ["| weight (in x out) | tokens | config | dtype | impl | dense (ms) | V:N:M (ms) | "
           "speedup | max rel err | weight bytes vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for t in timings:
    lines.append(f"| {t.in_features} x {t.out_features} | {t.tokens} | {t.config} | {t.dtype} | "
                 f"{t.implementation} | {t.dense_seconds * 1e3:.3f} | {t.vnm_seconds * 1e3:.3f} | "
                 f"{t.speedup:.2f}x | {t.max_rel_error:.1e} | {t.bytes_ratio:.3f} |")
  return "\n".join(lines)


def bench_main(argv: Sequence[str] | None = None) -> int:
  """``bench``: dense vs V:N:M matmul timings of a model's GEMM shapes on this device."""
  parser = ArgumentParser(
      prog="vnm-jax bench",
      description="Time y = x @ W dense and V:N:M (vnm_jax.vnm_matmul on the compressed "
                  "weight) in the same run, for every GEMM shape, token count and config; "
                  "print a markdown table. bench/kernel.py in the repository sweeps more.")
  _add_source_arguments(parser)
  parser.add_argument("--configs", nargs="+", type=config_argument,
                      default=[VNMConfig.parse(c) for c in DEFAULT_BENCH_CONFIGS],
                      help=f"V:N:M configs (default: {' '.join(DEFAULT_BENCH_CONFIGS)})")
  parser.add_argument("--tokens", nargs="+", type=positive_int_argument,
                      default=list(DEFAULT_BENCH_TOKENS),
                      help=f"activation rows (default: {' '.join(map(str, DEFAULT_BENCH_TOKENS))})")
  args = parser.parse_args(argv)
  shapes = model_shapes(args.model) if args.model else args.shapes
  _print_header(shapes, args.tokens, args.dtype)
  points = [(shape, tokens, config) for shape in sorted(shapes) for tokens in args.tokens
            for config in args.configs]
  timings = [vnm_jax.measure_matmul_speedup(k, n, tokens, config, dtype=jnp.dtype(args.dtype),
                                            implementation=args.implementation,
                                            repeats=args.repeats)
             for (k, n), tokens, config in tqdm(points, desc="timing GEMMs")]
  print(bench_table(timings))
  return 0
