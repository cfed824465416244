"""End-to-end greedy generation: dense vs V:N:M models made by `vnm_jax.convert_to_vnm`.

Every model runs `vnm_recipes.models.llama.generate_greedy` (KV cache, prefill and the
decode loop compiled as one program), so the sparse models run whatever
`vnm_jax.VNMLinear` runs. Per model and batch size it times three generations:

- prefill: a `--prompt-tokens` prompt at batch 1 and one new token (the prompt's
  forward pass, its cache writes and the head on the last position);
- short / long: a `--decode-prompt-tokens` prompt and 1 or 1 + `--new-tokens` new
  tokens. decode tokens/s = batch * new_tokens / (long - short), the difference taken
  within each round: prefill, host overhead and dispatch cancel out.

Timing: every program is called once first (compile + first run, reported as
"first call"), once more to warm up, then `--repeats` rounds; in each round every
(workload, model) pair runs once, models interleaved in a rotating order; each call
ends with `block_until_ready`; medians are reported. Ratios are against the dense
model of the same run. Beside each ratio: its physics limit, from the bytes the
model holds (decode: weights are read once per step) and from the FLOPs it executes
(prefill; the condensed layout runs 4/M of a pruned matmul's dense FLOPs).

Token check: the sparse model's greedy tokens must equal those of the dense model
with the same masks applied (masked dense); in float32 a mismatch is an error (exit 1).

    python bench/generation.py                          # CPU: SmolLM2-135M (GGUF), float32
    python bench/generation.py --device gpu             # Llama-7B-shaped stack, bf16
    python bench/generation.py --device gpu --small     # the GPU path, tiny sizes (any device)

SmolLM2 is read from the GGUF that `python -m vnm_recipes.llm fetch` downloads (set
VNM_JAX_CACHE_DIR, e.g. to runs/cache, to keep it in the repository's ignored runs/).
The GPU stack has random weights (never a download). Results: generation.json and
generation.md in `--out-dir` (default bench/results/generation_<device>[_small]/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vnm_jax
from vnm_jax import VNMConfig
from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama, LlamaConfig, generate_greedy

# A Llama-2-7B block (hidden 4096, MLP 11008, 32 heads of 128, no grouped-query
# attention), its 32000-token vocabulary and untied head; the number of blocks is
# --layers.
LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32,
               num_kv_heads=32, head_dim=128, rope_base=10000.0, tie_embeddings=False)
# --small: the same code path at sizes a CPU runs in seconds (grouped-query attention kept).
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=320, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=32, rope_base=10000.0,
             tie_embeddings=False)

# Defaults per --device: the CPU runs the real SmolLM2-135M, the GPU a 7B-shaped stack.
DEFAULTS = {
    "cpu": dict(model="smollm2", dtype="float32", configs=["64:2:5", "64:2:8"],
                batch_sizes=[1, 4], prompt_tokens=128, decode_prompt_tokens=32,
                new_tokens=64, repeats=7, layers=None, budget_seconds=None),
    "gpu": dict(model="llama7b", dtype="bfloat16",
                configs=["64:2:8", "64:2:5", "2:4", "128:2:8"], batch_sizes=[1, 16],
                prompt_tokens=2048, decode_prompt_tokens=1, new_tokens=255, repeats=5,
                layers=8, budget_seconds=160.0),
}
SMALL_OVERRIDES = dict(model="small", batch_sizes=[1, 2], prompt_tokens=24,
                       decode_prompt_tokens=8, new_tokens=8, repeats=3,
                       layers=None)

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books far faster than any scribe. Within fifty years "
    "presses were running in more than two hundred European cities, and the price of a "
    "book fell so far that ordinary merchants could own one. Scholars argue about how much "
    "of the Reformation, the scientific revolution and the rise of national languages can "
    "be traced to this one machine, but few doubt that it changed how ideas travelled. "
    "Newspapers, pamphlets and cheap almanacs followed, and by the eighteenth century a "
    "reading public had formed that governments could no longer ignore. ")


# --- models --------------------------------------------------------------------------------


def random_llama(config: LlamaConfig, dtype, seed: int = 0) -> Llama:
  """A Llama with random weights (nnx's default initialisers), parameters cast to dtype."""
  model = Llama(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), state))
  return model


def load_smollm2(dtype):
  """(model, tokenizer, source) of SmolLM2-135M from the GGUF `vnm_recipes.llm fetch` got."""
  from vnm_recipes import gguf

  path = gguf.find_smollm2_gguf()
  model, tokenizer = gguf.load_llama(path, dtype=dtype)
  return model, tokenizer, str(path)


def prompts(batch: int, length: int, *, tokenizer, vocab_size: int, seed: int) -> np.ndarray:
  """int32 (batch, length): rows of real text (tokenizer) or random ids; rows differ."""
  if tokenizer is not None:
    ids = tokenizer.encode(PROMPT_TEXT).ids
    stride = 7
    need = length + stride * (batch - 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    return np.stack([ids[i * stride:i * stride + length] for i in range(batch)]).astype(np.int32)
  rng = np.random.default_rng(seed + 1000 * batch + length)
  return rng.integers(0, vocab_size, (batch, length), dtype=np.int32)


def state_nbytes(model: nnx.Module) -> int:
  """Bytes of every array the model holds (what the device holds for it)."""
  return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)))


def vnm_layers(model: nnx.Module) -> list[vnm_jax.VNMLinear]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, vnm_jax.VNMLinear)]


def _used_inputs(jaxpr, outputs_used: list[bool]) -> list[bool]:
  """Which inputs of a jaxpr the used outputs depend on (looks inside custom_vjp/jvp and
  pjit calls, whose own DCE keeps every operand; other sub-jaxprs count as using all)."""
  from jax.extend import core

  live = {v for v, used in zip(jaxpr.outvars, outputs_used) if used and isinstance(v, core.Var)}
  for eqn in reversed(jaxpr.eqns):
    if not any(v in live for v in eqn.outvars if not isinstance(v, core.DropVar)):
      continue
    inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
    inner = getattr(inner, "jaxpr", inner)
    if inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
      used = _used_inputs(inner, [v in live for v in eqn.outvars])
    else:
      used = [True] * len(eqn.invars)
    live.update(v for v, u in zip(eqn.invars, used) if u and isinstance(v, core.Var))
  return [v in live for v in jaxpr.invars]


def decode_step_read_bytes(model: Llama, batch: int = 1, capacity: int = 8) -> int:
  """Bytes of the model's arrays that one decode step reads (from its jaxpr, so whatever
  layout the layers hold, only what the step uses counts). An embedding table counts
  whole where it is also the head (tied), one row per token where it is only gathered."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  cache = model.init_cache(batch, capacity)
  token = jnp.zeros((batch, 1), jnp.int32)

  def step(*leaves):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)).decode(token, cache)[0]

  closed = jax.make_jaxpr(step)(*leaves)
  used = _used_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  embedding = model.embed.embedding[...]
  total = 0
  for leaf, u in zip(leaves, used):
    if not u:
      continue
    if leaf is embedding and not model.config.tie_embeddings:
      total += batch * leaf.shape[-1] * leaf.dtype.itemsize
    else:
      total += int(leaf.size) * leaf.dtype.itemsize
  return total


def model_bytes(model: nnx.Module, config: LlamaConfig) -> dict:
  """Resident bytes, bytes a decode step reads, and the stored bytes of the V:N:M layers."""
  resident = state_nbytes(model)
  try:
    streamed = decode_step_read_bytes(model)
  except Exception as error:  # an analysis failure must not lose the timings
    print(f"warning: decode-step read bytes not found ({error!r}); using resident", flush=True)
    streamed = resident
  layers = vnm_layers(model)
  layer_resident = sum(state_nbytes(layer) for layer in layers)
  layer_stored = sum(int(layer.weight.nbytes) for layer in layers)
  layer_dense = sum(int(layer.weight.dense_nbytes) for layer in layers)
  return dict(resident=resident, streamed=streamed, vnm_layers=len(layers),
              vnm_layer_resident=layer_resident, vnm_layer_stored=layer_stored,
              vnm_layer_dense=layer_dense)


def masked_and_sparse(dense: Llama, config: VNMConfig,
                      implementation: str | None = None) -> tuple[Llama, Llama, dict]:
  """The masked dense model and the model `convert_to_vnm` makes of it (magnitude masks)."""
  params = nnx.state(dense, nnx.Param)
  masks = vnm_jax.tree_masks(params, config, filter=PRUNABLE_PATTERN)
  masked = nnx.clone(dense)
  nnx.update(masked, vnm_jax.tree_apply_masks(params, masks))
  start = time.perf_counter()
  sparse = vnm_jax.convert_to_vnm(nnx.clone(masked), masks, config,
                                  implementation=implementation)
  jax.block_until_ready(nnx.state(sparse))
  return masked, sparse, dict(convert_seconds=time.perf_counter() - start)


# --- physics ---------------------------------------------------------------------------------


def forward_flops(c: LlamaConfig, *, batch: int, tokens: int, capacity: int,
                  vnm: VNMConfig | None, last_only: bool = True) -> float:
  """FLOPs of one `decode` call of `tokens` new tokens per row, KV cache of `capacity`.

  Projections: 2 * tokens * K * N each, or for a V:N:M kernel the condensed layout's
  2 * tokens * (4 * ceil(K / M)) * ceil(N / V) * V (dense MMA on the 4-of-M columns).
  Attention: the two einsums over the whole cache (the model masks, it does not skip),
  4 * tokens * capacity * heads * head_dim. Head: on the last token (generation).
  Norms, RoPE, softmax, SwiGLU are left out (a few percent at most).
  """
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
  per_token = 0
  for k, n in shapes:
    if vnm is None:
      per_token += 2 * k * n
    else:
      per_token += 2 * 4 * -(-k // vnm.m) * -(-n // vnm.v) * vnm.v
  attention = 4 * capacity * c.num_heads * c.head_dim
  layers = c.num_layers * tokens * batch * (per_token + attention)
  head = 2 * batch * (1 if last_only else tokens) * d * c.vocab_size
  return float(layers + head)


def cache_bytes(c: LlamaConfig, batch: int, capacity: int, dtype) -> int:
  """Bytes of the KV cache, which attention reads whole at every step (masked, not cut)."""
  return (2 * c.num_layers * batch * capacity * c.num_kv_heads * c.head_dim
          * jnp.dtype(dtype).itemsize)


# --- timing ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
  """One generation that is timed: `new_tokens` tokens after a (batch, prompt_tokens) prompt."""

  name: str
  batch: int
  prompt_tokens: int
  new_tokens: int


def short_workload(b: int, args) -> str | None:
  """The run subtracted from long_b{b}: short_b{b}; prefill where that is the same run;
  None for a 1-token prompt (whose forward pass is itself a decode step)."""
  if args.decode_prompt_tokens == 1:
    return None
  if b == 1 and args.decode_prompt_tokens == args.prompt_tokens:
    return "prefill"
  return f"short_b{b}"


def workloads(args) -> list[Workload]:
  """prefill, then short_b{b} (see `short_workload`) and long_b{b} per batch size."""
  found = [Workload("prefill", 1, args.prompt_tokens, 1)]
  for b in args.batch_sizes:
    if short_workload(b, args) == f"short_b{b}":
      found.append(Workload(f"short_b{b}", b, args.decode_prompt_tokens, 1))
    found.append(Workload(f"long_b{b}", b, args.decode_prompt_tokens, 1 + args.new_tokens))
  return found


def run_once(model, prompt, new_tokens) -> tuple[float, np.ndarray]:
  start = time.perf_counter()
  tokens = jax.block_until_ready(generate_greedy(model, prompt, new_tokens))
  return time.perf_counter() - start, np.asarray(tokens)


def load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


# --- the run -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python bench/generation.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                      help="which defaults (CPU: SmolLM2 f32; GPU: 7B-shaped bf16); default: "
                           "the JAX backend")
  parser.add_argument("--small", action="store_true",
                      help="a tiny random model (runs anywhere in seconds; for tests)")
  parser.add_argument("--model", choices=["smollm2", "llama7b", "small"], default=None)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  parser.add_argument("--configs", nargs="+", default=None, help="V:N:M configs (2:4 = 64:2:4)")
  parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
  parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill prompt length")
  parser.add_argument("--decode-prompt-tokens", type=int, default=None,
                      help="prompt length of the decode measurement")
  parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
  parser.add_argument("--layers", type=int, default=None, help="blocks of the 7B-shaped stack")
  parser.add_argument("--budget-seconds", type=float, default=None,
                      help="stop adding configs / rounds past this (results are kept)")
  parser.add_argument("--implementation", choices=["pallas", "xla"], default=None,
                      help="convert_to_vnm's implementation (default: the library's choice; "
                           "pallas without a GPU runs the Pallas interpreter: slow, for tests)")
  parser.add_argument("--out-dir", type=Path, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  device = args.device or ("gpu" if backend == "gpu" else "cpu")
  if device == "gpu" and backend != "gpu" and not args.small:
    parser.error("--device gpu needs a GPU (jax backend is %r); add --small to run the "
                 "GPU path at tiny sizes here" % backend)
  defaults = dict(DEFAULTS[device])
  if args.small:
    defaults.update(SMALL_OVERRIDES)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for name in ("prompt_tokens", "decode_prompt_tokens", "new_tokens", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if any(b < 1 for b in args.batch_sizes):
    parser.error("--batch-sizes must be >= 1")
  try:
    args.vnm_configs = [VNMConfig.parse(c) for c in args.configs]
  except ValueError as error:
    parser.error(f"--configs: {error}")
  args.device = device
  if args.out_dir is None:
    args.out_dir = Path("bench/results") / f"generation_{device}{'_small' if args.small else ''}"
  return args


def build_dense(args):
  dtype = jnp.dtype(args.dtype)
  if args.model == "smollm2":
    model, tokenizer, source = load_smollm2(dtype)
    return model, model.config, tokenizer, f"SmolLM2-135M ({source})"
  sizes = dict(SMALL) if args.model == "small" else dict(LLAMA7B, num_layers=args.layers)
  if args.model == "small" and args.layers:
    sizes["num_layers"] = args.layers
  config = LlamaConfig(**sizes)
  name = "tiny random Llama" if args.model == "small" else "Llama-7B-shaped stack"
  return random_llama(config, dtype, args.seed), config, None, f"{name}, random weights"


def summarize(name, times, work, args):
  """Medians and derived figures of one model (times[workload] = list of seconds)."""
  med = {w.name: statistics.median(times[w.name]) for w in work if times[w.name]}
  out = dict(name=name, median_seconds=med)
  if "prefill" in med:
    out["prefill_seconds"] = med["prefill"]
  for b in args.batch_sizes:
    short_name, long_ = short_workload(b, args), times[f"long_b{b}"]
    if short_name is None:
      diffs, steps = long_, 1 + args.new_tokens
    else:
      diffs, steps = [lg - sh for sh, lg in zip(times[short_name], long_)], args.new_tokens
    if diffs:
      seconds = statistics.median(diffs)
      out[f"decode_b{b}_seconds"] = seconds
      out[f"decode_b{b}_steps"] = steps
      out[f"decode_b{b}_tokens_per_second"] = b * steps / seconds if seconds > 0 else None
  return out


def _round_seconds(dense: dict, sparse: dict, args):
  """(name, dense seconds per round, sparse seconds per round) of prefill and each decode."""
  yield "prefill", dense["times"]["prefill"], sparse["times"]["prefill"]
  for b in args.batch_sizes:
    short = short_workload(b, args)

    def per_round(s):
      long_ = s["times"][f"long_b{b}"]
      return long_ if short is None else [lg - sh for sh, lg in zip(s["times"][short], long_)]

    yield f"decode_b{b}", per_round(dense), per_round(sparse)


def results(names, entries, times, first_call, work, args, c) -> list[dict]:
  """One summary per model (dense first): medians, ratios against dense, limits, bytes."""
  found, dense = [], None
  for name in names:
    vnm = None if name == "dense" else VNMConfig.parse(name)
    s = summarize(name, times[name], work, args)
    s.update(entries[name])
    s["first_call_seconds"] = first_call[name]
    s["compile_seconds_estimate"] = {k: v - s["median_seconds"][k]
                                     for k, v in first_call[name].items()
                                     if k in s["median_seconds"]}
    s["times"] = times[name]
    s["prefill_flops"] = forward_flops(c, batch=1, tokens=args.prompt_tokens,
                                       capacity=args.prompt_tokens + 1, vnm=vnm)
    s["decode_step_flops_b1"] = forward_flops(
        c, batch=1, tokens=1, capacity=args.decode_prompt_tokens + 1 + args.new_tokens, vnm=vnm)
    if dense is None:
      dense = s
    else:
      s["limits"] = dict(
          decode_resident_bytes=dense["bytes"]["resident"] / s["bytes"]["resident"],
          decode_streamed_bytes=dense["bytes"]["streamed"] / s["bytes"]["streamed"],
          prefill_flops=dense["prefill_flops"] / s["prefill_flops"],
          decode_flops=dense["decode_step_flops_b1"] / s["decode_step_flops_b1"])
      for b in args.batch_sizes:  # a step also reads the whole KV cache, alike for both
        cache = cache_bytes(c, b, args.decode_prompt_tokens + 1 + args.new_tokens, args.dtype)
        s["limits"][f"decode_b{b}_bytes"] = ((dense["bytes"]["streamed"] + cache)
                                             / (s["bytes"]["streamed"] + cache))
      ratios = {}
      if s.get("prefill_seconds") and dense.get("prefill_seconds"):
        ratios["prefill"] = dense["prefill_seconds"] / s["prefill_seconds"]
      for b in args.batch_sizes:
        key = f"decode_b{b}_tokens_per_second"
        if s.get(key) and dense.get(key):
          ratios[f"decode_b{b}"] = s[key] / dense[key]
      s["speedup_vs_dense"] = ratios
      # The same ratios round by round (each round runs every model back to back): their
      # spread shows how much a drifting machine moved the medians.
      s["speedup_by_round"] = {
          key: [d / x for d, x in zip(dense_rounds, rounds)]
          for key, dense_rounds, rounds in _round_seconds(dense, s, args)}
    found.append(s)
  return found


def main(argv=None) -> int:
  args = parse_args(argv)
  wall = time.perf_counter()
  out_dir = args.out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"generation bench: device {args.device}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, model {args.model}, {args.dtype}", flush=True)
  load_at_start = load()

  dense, c, tokenizer, source = build_dense(args)
  work = workloads(args)
  prompts_by_work = {w.name: jnp.asarray(prompts(w.batch, w.prompt_tokens, tokenizer=tokenizer,
                                                 vocab_size=c.vocab_size, seed=args.seed))
                     for w in work}

  def over_budget(fraction=1.0):
    return (args.budget_seconds is not None
            and time.perf_counter() - wall > fraction * args.budget_seconds)

  argv_used = argv if argv is not None else sys.argv[1:]
  record = dict(
      command="python bench/generation.py " + " ".join(shlex.quote(a) for a in argv_used),
      device=args.device, backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      jax=jax.__version__, python=platform.python_version(), machine=platform.machine(),
      cpu_count=os.cpu_count(), model=args.model, source=source, dtype=args.dtype,
      llama_config=dataclasses.asdict(c), small=args.small, configs=args.configs,
      batch_sizes=args.batch_sizes, prompt_tokens=args.prompt_tokens,
      decode_prompt_tokens=args.decode_prompt_tokens, new_tokens=args.new_tokens,
      repeats=args.repeats, budget_seconds=args.budget_seconds,
      implementation=args.implementation or "library default",
      masks="magnitude, column_l1 rule (speed does not depend on the scores)",
      workloads=[dataclasses.asdict(w) for w in work], load_at_start=load_at_start,
      load_at_timing_start=None, load_at_end=None, rounds=0, models=[], complete=False)
  models = {"dense": dense}
  entries = {"dense": dict(name="dense", config=None, bytes=model_bytes(dense, c))}
  first_call = {}
  times = {}

  def save():
    names = [n for n in models if n in times]
    record["models"] = results(names, entries, times, first_call, work, args, c)
    record["tokens_equal"] = all(s.get("tokens_equal", True) for s in record["models"])
    record["wall_seconds"] = time.perf_counter() - wall
    (out_dir / "generation.json").write_text(json.dumps(record, indent=1))
    (out_dir / "generation.md").write_text(markdown(record))

  # Every program of every model called once (compile + first run), sparse tokens checked
  # against the masked dense model's.
  first_call["dense"] = {w.name: run_once(dense, prompts_by_work[w.name], w.new_tokens)[0]
                         for w in work}
  times["dense"] = {w.name: [] for w in work}
  print(f"dense: first calls {first_call['dense']}", flush=True)
  for vnm in args.vnm_configs:
    if over_budget(0.6):
      print(f"budget: skipping {vnm} and later configs", flush=True)
      break
    name = str(vnm)
    masked, sparse, info = masked_and_sparse(dense, vnm, args.implementation)
    check, first_call[name] = {}, {}
    for w in work:
      prompt = prompts_by_work[w.name]
      first_call[name][w.name], out = run_once(sparse, prompt, w.new_tokens)
      reference = run_once(masked, prompt, w.new_tokens)[1]
      same = out == reference
      check[w.name] = dict(equal=bool(same.all()), token_agreement=float(same.mean()),
                           common_prefix=int(np.argmin(np.append(same.all(axis=0), False))))
    del masked
    models[name] = sparse
    times[name] = {w.name: [] for w in work}
    entries[name] = dict(name=name, config=name, bytes=model_bytes(sparse, c), tokens=check,
                         tokens_equal=all(v["equal"] for v in check.values()), **info)
    print(f"{name}: converted in {info['convert_seconds']:.1f} s, first calls "
          f"{first_call[name]}, tokens equal to masked dense: {entries[name]['tokens_equal']}",
          flush=True)
    save()

  # One more warm call each, then the timed rounds, models interleaved (rotating order).
  names = list(models)
  for name in names:
    for w in work:
      run_once(models[name], prompts_by_work[w.name], w.new_tokens)
  record["load_at_timing_start"] = load()
  for r in range(args.repeats):
    if r >= 2 and over_budget():
      print(f"budget: stopping after {r} rounds", flush=True)
      break
    for w in work:
      for name in names[r % len(names):] + names[:r % len(names)]:
        times[name][w.name].append(run_once(models[name], prompts_by_work[w.name],
                                            w.new_tokens)[0])
    record["rounds"] = r + 1
    record["load_at_end"] = load()
    save()
    print(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - wall:.0f} s)", flush=True)
  record["complete"] = (record["rounds"] == args.repeats
                        and len(names) == 1 + len(args.vnm_configs))
  save()
  print(markdown(record))
  print(f"wrote {out_dir / 'generation.json'} and generation.md", flush=True)
  if not record["tokens_equal"] and args.dtype == "float32":
    print("ERROR: a compressed model's greedy tokens differ from the masked dense model's",
          file=sys.stderr)
    return 1
  return 0


# --- report ------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", suffix=""):
  return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(record: dict) -> str:
  """The record as markdown: ratios against dense with their physics limits beside them."""
  models = record.get("models", [])
  batches = record["batch_sizes"]
  if record["decode_prompt_tokens"] == 1:
    decode = (f"{1 + record['new_tokens']} greedy steps from a 1-token prompt (its forward "
              f"pass is a decode step too), tokens/s = batch x steps / time")
  else:
    decode = (f"{record['new_tokens']} greedy steps after a {record['decode_prompt_tokens']}-"
              f"token prompt, tokens/s = batch x steps / (time with - time without them)")
  lines = [f"Command: `{record['command']}`",
           "",
           f"Device: {record['device_kind']} ({record['backend']}), jax {record['jax']}, "
           f"{record['cpu_count']} CPUs; model: {record['source']}, {record['dtype']}. "
           f"Load average (1, 5, 15 min) at start {record['load_at_start']}, when timing "
           f"began {record.get('load_at_timing_start')}, at end {record.get('load_at_end')}. "
           f"Medians of {record.get('rounds', 0)} rounds, models interleaved.",
           f"Prefill: batch 1, a {record['prompt_tokens']}-token prompt, one new token. "
           f"Decode: {decode}.",
           ""]
  header = ["model", "resident MB", "read/step MB", "prefill ms", "prefill x (limit)"]
  for b in batches:
    header += [f"decode b{b} tok/s", f"decode b{b} x (limit)"]
  header += ["first calls s", "tokens = masked dense"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s in models:
    limits, ratios = s.get("limits", {}), s.get("speedup_vs_dense", {})
    dense = s["name"] == "dense"
    prefill = s.get("prefill_seconds")
    row = [s["name"], _fmt(s["bytes"]["resident"] / 2**20, ".1f"),
           _fmt(s["bytes"]["streamed"] / 2**20, ".1f"),
           _fmt(None if prefill is None else prefill * 1e3, ".1f"),
           "-" if dense else (f"{_fmt(ratios.get('prefill'), '.2f', 'x')} "
                              f"({_fmt(limits.get('prefill_flops'), '.2f', 'x')})")]
    for b in batches:
      row.append(_fmt(s.get(f"decode_b{b}_tokens_per_second"), ".1f"))
      row.append("-" if dense else (f"{_fmt(ratios.get(f'decode_b{b}'), '.2f', 'x')} "
                                    f"({_fmt(limits.get(f'decode_b{b}_bytes'), '.2f', 'x')})"))
    row.append(_fmt(sum(s.get("first_call_seconds", {}).values()), ".1f"))
    row.append("-" if dense else ("yes" if s.get("tokens_equal") else "NO"))
    lines.append("| " + " | ".join(row) + " |")
  lines += ["",
            "Limits: decode, dense bytes read per step / the sparse model's (the arrays a "
            "decode step reads, from its jaxpr, an untied embedding table counting one row, "
            "plus the KV cache, read whole by both); "
            "prefill, dense FLOPs / executed FLOPs (pruned matmuls at 4/M, the condensed "
            "layout on dense matrix units; attention and head unchanged). Resident limits "
            "(dense bytes held / sparse bytes held): " + ", ".join(
                f"{s['name']} {s['limits']['decode_resident_bytes']:.2f}x"
                for s in models if "limits" in s) + ".",
            "First calls: compile + first run of every timed program, summed."]
  for s in models:
    spread = [f"{key} {min(v):.2f}-{max(v):.2f}x"
              for key, v in s.get("speedup_by_round", {}).items() if v]
    if spread:
      lines.append(f"{s['name']}: ratio range over the rounds: " + ", ".join(spread) + ".")
  for s in models:
    b = s["bytes"]
    if b.get("vnm_layers"):
      lines.append(f"{s['name']}: {b['vnm_layers']} pruned projections, dense "
                   f"{b['vnm_layer_dense'] / 2**20:.1f} MB; stored "
                   f"{b['vnm_layer_stored'] / 2**20:.1f} MB "
                   f"({b['vnm_layer_stored'] / b['vnm_layer_dense']:.3f}x), resident "
                   f"{b['vnm_layer_resident'] / 2**20:.1f} MB "
                   f"({b['vnm_layer_resident'] / b['vnm_layer_dense']:.3f}x).")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
