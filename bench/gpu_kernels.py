"""The Pallas decode and prefill kernels against dense cuBLAS, in one run; the crossover table.

    python bench/gpu_kernels.py --out-dir $OUT              # all sections, bfloat16, ~3-4 min
    python bench/gpu_kernels.py --sections sweep crossover  # defaults only
    python bench/gpu_kernels.py --smoke                     # tiny shapes, interpreter, any machine

Sections, in the order they run:
  tune-decode   4096x4096, 64:2:8, 1 and 16 tokens: prepare blocks (block_v, block_groups)
                (with num_stages 4), then num_stages 2 and 6, then 8 warps.
  tune-prefill  4096x4096, 128:2:8 (and 64:2:8, fewer), 4096 tokens: block_tokens,
                block_groups, num_warps, num_stages.
  crossover     4096x4096 x 2:4, 64:2:5, 64:2:8, 128:2:8 x 1..4096 tokens: dense vs decode
                vs prefill, written as crossover_<dtype>.json for the dispatcher.
  sweep         Llama-7B shapes (4096x4096, 4096x11008, 11008x4096) x the same configs:
                decode at 1 and 16 tokens, prefill at 4096 tokens, with the tuned best
                options where tuning ran (else the defaults).

Weights: random normal values at random 2-of-4 positions of 4 random columns per group
(what ``compress`` stores for a kernel without a permutation), built on the device.

Timing (.library/device/METHOD.md): a timed call is one jitted function running
``--chain`` matmuls, each on its own copy of the weight (copies, so that no weight sits
in the H200's 60 MB L2 from one matmul to the next, as in a model whose layers differ)
and its own x; warm-up, ``block_until_ready``, each variant interleaved with dense in
the same loop, median of ``--repeats``; reported per matmul, launch gaps included as in
a model. Inputs are random normal (never zeros). Errors: max |y - x @ W| / max |x @ W|
against float32 dense math. Results: gpu_kernels.json (every record), gpu_kernels.md,
crossover_<dtype>.json, written after every measurement, so a timeout keeps the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax import VNMWeight, decompress
from vnm_jax.config import VNMConfig
from vnm_jax.ops.vnm_matmul.layout import pack_positions
from vnm_jax.benchmarking import time_calls
from vnm_jax.ops.vnm_matmul import pallas_decode, pallas_prefill

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
CONFIGS = ("2:4", "64:2:5", "64:2:8", "128:2:8")
CROSSOVER_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
DECODE_MAX_TOKENS = 256  # decode timed up to here, prefill from 64 on (the overlap decides)
PREFILL_MIN_TOKENS = 64
KERNELS = {"decode": pallas_decode, "prefill": pallas_prefill}


def _split_options(kernel: str, options: dict) -> tuple[dict, dict]:
  """Options -> (prepare kwargs, matmul kwargs)."""
  prepare_keys = ("block_v", "block_groups") if kernel == "decode" else ("block_groups",)
  prep = {k: v for k, v in options.items() if k in prepare_keys and v is not None}
  call = {k: v for k, v in options.items() if k not in prepare_keys and v is not None}
  return prep, call


class Bench:
  """Shared state of one run: device, problems, records and their files."""

  def __init__(self, args):
    self.args = args
    self.dtype = jnp.dtype(args.dtype)
    self.interpret = args.smoke or jax.default_backend() != "gpu"
    self.device = f"{jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}"
    self.records: list[dict] = []
    self.start = time.monotonic()
    self._problem_key = None
    self._problem = None
    self._compressed = {}
    os.makedirs(args.out_dir, exist_ok=True)

  def out_of_time(self) -> bool:
    return time.monotonic() - self.start > self.args.max_seconds

  def problem(self, shape, config, tokens):
    """(w, dense weight copies, xs, exact y of xs[0]) for a shape, config and token count."""
    k, n = shape
    if (shape, config) not in self._compressed:
      self._compressed[(shape, config)] = random_weight(shape, config, self.dtype)
    w = self._compressed[(shape, config)]
    key = (shape, config, self.args.chain)
    if self._problem_key != key:
      self._problem, self._problem_key = None, None  # free the previous copies first
      dense = decompress(w)
      copies = [dense] + [jnp.copy(dense) for _ in range(self.args.chain - 1)]
      self._problem, self._problem_key = (copies, {}), key
    copies, xs_by_tokens = self._problem
    if tokens not in xs_by_tokens:
      rng = np.random.default_rng(tokens)
      xs = [jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32).astype(self.dtype)
            for _ in range(self.args.chain)]
      exact = jnp.dot(xs[0].astype(jnp.float32), copies[0].astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
      xs_by_tokens[tokens] = (xs, exact)
    return (w, copies, *xs_by_tokens[tokens])

  def measure(self, section, shape, config, tokens, kernel, options):
    """Times one kernel variant against dense on one problem; records and saves it."""
    if self.out_of_time():
      return None
    for done in self.records:  # measured already in another section: reuse it
      if "ms" in done and (done["shape"], done["config"], done["tokens"], done["kernel"],
                           done["options"]) == (list(shape), config, tokens, kernel, options):
        self.save({**done, "section": section})
        return self.records[-1]
    module = KERNELS[kernel]
    w, copies, xs, exact = self.problem(shape, config, tokens)
    prep, call = _split_options(kernel, options)
    record = dict(section=section, shape=list(shape), config=config, tokens=tokens,
                  kernel=kernel, options=options, dtype=self.dtype.name)
    try:
      layout = module.prepare(w.values, w.meta, w.columns, m=w.config.m, **prep)
      layouts = [layout] + [jax.tree.map(jnp.copy, layout) for _ in range(self.args.chain - 1)]
      sparse = jax.jit(lambda xs, ls: [module.matmul(x, lay, m=w.config.m,
                                                     interpret=self.interpret, **call)
                                       for x, lay in zip(xs, ls)])
      dense = jax.jit(lambda xs, ws: [jnp.dot(x, wd) for x, wd in zip(xs, ws)])
      y = np.asarray(sparse(xs, layouts)[0][:, :shape[1]], np.float32)
      exact_np = np.asarray(exact)
      record["rel_err"] = float(np.abs(y - exact_np).max() / max(np.abs(exact_np).max(), 1e-30))
      times = time_calls({"dense": lambda: dense(xs, copies), "vnm": lambda: sparse(xs, layouts)},
                         repeats=self.args.repeats)
    except Exception as error:  # a variant the compiler rejects is a result, not a crash
      record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
      print(f"{section} {shape} {config} T={tokens} {kernel} {options}: {record['error']}",
            flush=True)
      self.save(record)
      return record
    record["dense_ms"] = times["dense"] / self.args.chain * 1e3
    record["ms"] = times["vnm"] / self.args.chain * 1e3
    record["speedup"] = record["dense_ms"] / record["ms"]
    resident = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layout))
    record["resident_vs_dense"] = resident / (shape[0] * shape[1] * self.dtype.itemsize)
    record["stored_vs_dense"] = w.nbytes / w.dense_nbytes
    print(f"{section:12s} {shape[0]}x{shape[1]} {config:7s} T={tokens:<5d} {kernel:7s} "
          f"{json.dumps(options):60s} {record['ms']:.4f} ms  dense {record['dense_ms']:.4f}  "
          f"{record['speedup']:.2f}x  err {record['rel_err']:.1e}", flush=True)
    self.save(record)
    return record

  def save(self, record):
    self.records.append(record)
    meta = dict(device=self.device, dtype=self.dtype.name, chain=self.args.chain,
                repeats=self.args.repeats, interpret=self.interpret)
    with open(os.path.join(self.args.out_dir, "gpu_kernels.json"), "w") as f:
      json.dump({**meta, "records": self.records}, f, indent=1)
    with open(os.path.join(self.args.out_dir, "gpu_kernels.md"), "w") as f:
      f.write(markdown(self.records, self.device))
    table = crossover_table([r for r in self.records if r["section"] == "crossover"])
    if table:
      with open(os.path.join(self.args.out_dir, f"crossover_{self.dtype.name}.json"), "w") as f:
        json.dump({**meta, **table}, f, indent=1)


def random_weight(shape, config, dtype, seed=0) -> VNMWeight:
  """A random V:N:M weight built on the device (compress's host-side checks take seconds
  at these sizes): normal values, random 2-of-4 positions, 4 sorted distinct columns of
  each group of M (the layout compress gives without a permutation)."""
  cfg = VNMConfig.parse(config)
  k, n = shape
  groups, row_blocks = -(-k // cfg.m), -(-n // cfg.v)
  key_v, key_p, key_c = jax.random.split(jax.random.key(seed), 3)
  values = jax.random.normal(key_v, (row_blocks, 2, groups, cfg.v), jnp.float32).astype(dtype)
  pairs = jnp.array([(a, b) for a in range(4) for b in range(a + 1, 4)], jnp.int32)
  chosen = pairs[jax.random.randint(key_p, (row_blocks, groups, cfg.v), 0, len(pairs))]
  meta = pack_positions(jnp.moveaxis(chosen, -1, 1))  # (R, 2, G, V) -> (R, G, V/2)
  order = jnp.argsort(jax.random.uniform(key_c, (row_blocks, groups, cfg.m)), axis=-1)
  within = jnp.sort(order[..., :4], axis=-1)
  columns = (within + jnp.arange(groups)[:, None] * cfg.m).transpose(0, 2, 1).astype(jnp.int32)
  return VNMWeight(values, meta, columns, None, (k, n), cfg)


def best(records, **match):
  """The fastest error-free record whose fields equal ``match``, or None."""
  fits = [r for r in records if "ms" in r and all(r.get(k) == v for k, v in match.items())]
  return min(fits, key=lambda r: r["ms"]) if fits else None


def markdown(records, device) -> str:
  lines = [f"device: {device}", "",
           "| section | weight (in x out) | config | tokens | kernel | options | dense (ms) | "
           "V:N:M (ms) | speedup | rel err | resident vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    if "ms" not in r:
      lines.append(f"| {r['section']} | {r['shape'][0]} x {r['shape'][1]} | {r['config']} | "
                   f"{r['tokens']} | {r['kernel']} | {json.dumps(r['options'])} | | | failed | "
                   f"{r['error'][:60]} | |")
      continue
    lines.append(f"| {r['section']} | {r['shape'][0]} x {r['shape'][1]} | {r['config']} | "
                 f"{r['tokens']} | {r['kernel']} | {json.dumps(r['options'])} | "
                 f"{r['dense_ms']:.4f} | {r['ms']:.4f} | {r['speedup']:.2f}x | "
                 f"{r['rel_err']:.1e} | {r['resident_vs_dense']:.3f} |")
  return "\n".join(lines) + "\n"


def crossover_table(records) -> dict:
  """Per config: dense/decode/prefill ms by token count and the token counts to switch at.

  ``decode_max_tokens``: the largest measured count up to which decode is never slower
  than prefill; the dispatcher runs decode up to it and prefill above it.
  ``dense_faster_at``: measured counts where dense beat both kernels.
  """
  out = {}
  for config in sorted({r["config"] for r in records}):
    rows = [r for r in records if r["config"] == config and "ms" in r]
    tokens = sorted({r["tokens"] for r in rows})
    if not tokens:
      continue
    entry = dict(shape=rows[0]["shape"], tokens=tokens, dense_ms=[], decode_ms=[],
                 prefill_ms=[], best=[])
    for t in tokens:
      times = {"dense": min((r["dense_ms"] for r in rows if r["tokens"] == t), default=None)}
      for kernel in ("decode", "prefill"):
        found = best(rows, tokens=t, kernel=kernel)
        times[kernel] = found["ms"] if found else None
        entry[f"{kernel}_ms"].append(times[kernel])
      entry["dense_ms"].append(times["dense"])
      entry["best"].append(min((k for k in times if times[k] is not None), key=times.get))
    decode_max = None
    for t, dec, pre in zip(tokens, entry["decode_ms"], entry["prefill_ms"]):
      if dec is None or (pre is not None and pre < dec):
        break
      decode_max = t
    entry["decode_max_tokens"] = decode_max
    entry["dense_faster_at"] = [t for t, b in zip(tokens, entry["best"]) if b == "dense"]
    out[config] = entry
  return {"crossover": out} if out else {}


def tune_decode(bench, shape, config, tokens_list):
  args = bench.args
  grid = [dict(block_v=bv, block_groups=bg) for bv, bg in
          itertools.product(args.decode_block_v, args.decode_block_groups)]
  grid += [dict(num_stages=s) for s in (2, 6)] + [dict(num_warps=8)]
  for tokens, options in itertools.product(tokens_list, grid):
    bench.measure("tune-decode", shape, config, tokens, "decode", options)


def tune_prefill(bench, shape, configs, tokens):
  args = bench.args
  for i, config in enumerate(configs):
    v = VNMConfig.parse(config).v
    # The first config gets the full grid, the others tile sizes and warps only.
    # Stages 3 and 4 build the same 2-buffer pipeline here (bench/triton_check.py); 5
    # gives 3 buffers. 16 warps halve the accumulator's registers per thread.
    warps_stages = ((4, 3), (8, 3), (8, 5), (16, 3)) if i == 0 else ((4, 3), (8, 3))
    groups = args.prefill_block_groups if i == 0 else args.prefill_block_groups[1:2]
    for bt, bg, (warps, stages) in itertools.product(args.prefill_block_tokens, groups,
                                                     warps_stages):
      if warps == 4 and bt * v >= 256 * 128:  # a 256x128 float32 tile in 128 threads spills
        continue
      bench.measure("tune-prefill", shape, config, tokens, "prefill",
                    dict(block_tokens=bt, block_groups=bg, num_warps=warps, num_stages=stages))


def tuned(bench, section, tokens=None):
  """Options of the fastest tuned variant (relative to dense) of a kernel, or {}."""
  rows = [r for r in bench.records if r["section"] == section and "speedup" in r
          and (tokens is None or r["tokens"] == tokens)]
  return max(rows, key=lambda r: r["speedup"])["options"] if rows else {}


def sweep(bench, shapes, configs, decode_tokens, prefill_tokens):
  # The tuned best (4096x4096) where tuning ran, else the defaults; block_v was tuned
  # for 4096 outputs, so other shapes keep their default slicing.
  for shape, config in itertools.product(shapes, configs):
    for tokens in decode_tokens:
      options = tuned(bench, "tune-decode", tokens)
      bench.measure("sweep", shape, config, tokens, "decode",
                    {k: v for k, v in options.items() if k != "block_v"})
    for tokens in prefill_tokens:
      bench.measure("sweep", shape, config, tokens, "prefill", tuned(bench, "tune-prefill"))


def crossover(bench, shape, configs, tokens_list):
  decode_best = tuned(bench, "tune-decode", 16)
  prefill_best = tuned(bench, "tune-prefill")
  decode_best = {k: v for k, v in decode_best.items() if k != "block_v"}
  for config, tokens in itertools.product(configs, tokens_list):
    if tokens <= DECODE_MAX_TOKENS:
      bench.measure("crossover", shape, config, tokens, "decode", decode_best)
    if tokens >= PREFILL_MIN_TOKENS:
      bench.measure("crossover", shape, config, tokens, "prefill", prefill_best)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", nargs="+", default=["tune-decode", "tune-prefill", "sweep",
                                                        "crossover"],
                      choices=["tune-decode", "tune-prefill", "sweep", "crossover"])
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
  parser.add_argument("--chain", type=int, default=None,
                      help="matmuls per timed call, each with its own weight copy (default 32 "
                           "up to 256 tokens, 4 above; 2 with --smoke)")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--max-seconds", type=float, default=1e9,
                      help="start no new measurement after this many seconds")
  parser.add_argument("--decode-block-v", nargs="+", type=int, default=[16])
  parser.add_argument("--decode-block-groups", nargs="+", type=int, default=[32, 64, 128])
  parser.add_argument("--prefill-block-tokens", nargs="+", type=int, default=[128, 256])
  parser.add_argument("--prefill-block-groups", nargs="+", type=int, default=[8, 16, 32])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes in the Pallas interpreter: checks this script anywhere")
  parser.add_argument("--out-dir", default="bench/results/gpu")
  args = parser.parse_args(argv)
  big, shapes = (4096, 4096), LLAMA_SHAPES
  decode_tokens, prefill_tokens, cross_tokens = (1, 16), (4096,), CROSSOVER_TOKENS
  if args.smoke:
    big, shapes = (128, 128), ((128, 128), (96, 160))
    decode_tokens, prefill_tokens, cross_tokens = (1, 16), (64,), (1, 16, 64, 128)
    args.repeats, args.configs = min(args.repeats, 2), args.configs[:2]
    args.decode_block_v, args.decode_block_groups = [16], [16]
    args.prefill_block_tokens, args.prefill_block_groups = [64], [8]
  chain = args.chain
  bench = Bench(args)
  print(f"device: {bench.device}; interpret={bench.interpret}", flush=True)

  def run(section, fn, tokens_hint):
    if section in args.sections and not bench.out_of_time():
      args.chain = chain or (2 if args.smoke else 32 if tokens_hint <= 256 else 4)
      fn()

  # Crossover before the sweep: the dispatcher needs it, and the sweep reuses its
  # 4096x4096 rows; --max-seconds cuts whatever comes last.
  run("tune-decode", lambda: tune_decode(bench, big, "64:2:8", decode_tokens), 1)
  run("tune-prefill", lambda: tune_prefill(bench, big, ["128:2:8", "64:2:8"], prefill_tokens[0]),
      4096)
  run("crossover", lambda: crossover(bench, big, args.configs,
                                     [t for t in cross_tokens if t <= 256]), 1)
  run("crossover", lambda: crossover(bench, big, args.configs,
                                     [t for t in cross_tokens if t > 256]), 4096)
  run("sweep", lambda: sweep(bench, shapes, args.configs, decode_tokens, ()), 1)
  run("sweep", lambda: sweep(bench, shapes, args.configs, (), prefill_tokens), 4096)
  table = crossover_table([r for r in bench.records if r["section"] == "crossover"])
  for config, entry in table.get("crossover", {}).items():
    print(f"crossover {config}: decode up to {entry['decode_max_tokens']} tokens; best "
          f"{dict(zip(entry['tokens'], entry['best']))}")
  print(markdown([r for r in bench.records if r["section"] == "sweep"], bench.device))
  return bench.records


if __name__ == "__main__":
  main()
