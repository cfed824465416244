"""V:N:M matmul vs dense matmul on the weight shapes of real models, measured in the same run.

For every (weight shape, tokens, config) it times ``jnp.dot(x, W)`` and
``vnm_jax.vnm_matmul(x, compress(W))`` (median of repeated runs after warm-up,
``block_until_ready``), and reports the speedup, the max error against dense math
(x @ decompress(w) in float32) and the stored weight bytes against the dense ones.
Results are printed as a markdown table and saved as JSON and markdown.

    python bench/kernel.py                                    # all shapes, CPU defaults
    python bench/kernel.py --models llama --tokens 256 --configs 64:2:8 64:2:5
    python bench/kernel.py --dtype bfloat16 --implementation pallas   # on a GPU
    python bench/kernel.py --layouts --shapes 4096x4096 --tokens 16 4096   # Pallas layouts

``--layouts`` instead compares, per shape, the packed Pallas kernel (2 values + 2-bit
positions expanded in-kernel), the Pallas kernel on a condensed weight with the 2:4
zeros stored (precomputed, so its expansion is not timed), ``vnm_matmul``'s Pallas
path (condensing per call, then the condensed kernel), the XLA path and dense.
``--tune`` times both kernels' block sizes on one shape; ``--tune-xla`` the XLA path's
row blocks per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform

import jax
import jax.numpy as jnp
from tqdm import tqdm

from vnm_jax.ops.vnm_matmul.layout import condense
from pallas_kernels.vnm_matmul import vnm_matmul_pallas_condensed, vnm_matmul_pallas_packed
from vnm_jax import compress
from vnm_jax.benchmarking import measure_matmul_speedup, time_calls
from vnm_jax.matmul import vnm_matmul
from vnm_jax.matmul_xla import matmul_blocks

# (in_features, out_features) of the GEMMs of each model.
MODEL_SHAPES = {
    "llama": [(4096, 4096), (4096, 11008), (11008, 4096)],  # Llama-7B attention, MLP up, down
    "deit": [(768, 768), (768, 3072), (3072, 768)],  # DeiT-base attention, MLP up, down
}
DEFAULT_TOKENS = (1, 16, 256, 2048)
DEFAULT_CONFIGS = ("2:4", "64:2:5", "64:2:8", "128:2:8", "64:2:16")


def _shape(text: str) -> tuple[int, int]:
  try:
    k, n = (int(part) for part in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a shape is IN x OUT like 4096x11008, got {text!r}")
  return k, n


def markdown_table(records: list[dict]) -> str:
  """The records of :func:`run_sweep` as a markdown table."""
  lines = ["| weight (in x out) | tokens | config | dtype | impl | dense (ms) | V:N:M (ms) | "
           "speedup | max rel err | weight bytes vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['in_features']} x {r['out_features']} | {r['tokens']} | {r['config']} | "
                 f"{r['dtype']} | {r['implementation']} | {r['dense_seconds'] * 1e3:.3f} | "
                 f"{r['vnm_seconds'] * 1e3:.3f} | {r['speedup']:.2f}x | "
                 f"{r['max_rel_error']:.1e} | {r['bytes_ratio']:.3f} |")
  return "\n".join(lines)


def run_sweep(shapes, tokens, configs, *, dtype, implementation, repeats, calls_per_run=None,
              save=lambda records: None) -> list[dict]:
  """measure_matmul_speedup over the cross product; one record dict per point.

  Each (shape, config) is compressed once (from a random normal kernel) and timed at
  every token count. ``save(records)`` runs after every point, so that a run cut
  short keeps what it measured.
  """
  records = []
  progress = tqdm(total=len(shapes) * len(tokens) * len(configs), desc="kernel bench",
                  unit="point")
  for (k, n), config in itertools.product(shapes, configs):
    kernel = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(dtype)
    weight = compress(kernel, config)
    for t in tokens:
      timing = measure_matmul_speedup(k, n, t, config, dtype=dtype,
                                      implementation=implementation, repeats=repeats,
                                      calls_per_run=calls_per_run, weight=weight)
      record = timing.as_dict()
      records.append(record)
      save(records)
      progress.update()
      tqdm.write(f"{k}x{n} tokens={t} {timing.config}: dense {timing.dense_seconds * 1e3:.3f} "
                 f"ms, vnm {timing.vnm_seconds * 1e3:.3f} ms, {timing.speedup:.2f}x")
  progress.close()
  return records


def run_layouts(shapes, tokens, config, *, dtype, repeats, calls_per_run) -> list[dict]:
  """Dense vs packed Pallas vs condensed Pallas vs XLA, per (shape, tokens), in one run."""
  interpret = jax.default_backend() != "gpu"
  rows = []
  for (k, n), t in itertools.product(shapes, tokens):
    key_w, key_x = jax.random.split(jax.random.key(0))
    kernel = jax.random.normal(key_w, (k, n), jnp.float32).astype(dtype)
    w = compress(kernel, config)
    condensed = condense(w.values, w.meta)
    xs = [jax.random.normal(key, (t, k), jnp.float32).astype(dtype)
          for key in jax.random.split(key_x, calls_per_run)]
    m = w.config.m
    fns = {
        "dense": jax.jit(lambda xs, kernel: [jnp.dot(x, kernel) for x in xs]),
        "pallas_packed": jax.jit(lambda xs, w: [
            vnm_matmul_pallas_packed(x, w.values, w.meta, w.columns, m=m, interpret=interpret)
            for x in xs]),
        "pallas_condensed": jax.jit(lambda xs, c, cols: [
            vnm_matmul_pallas_condensed(x, c, cols, m=m, interpret=interpret) for x in xs]),
        "op_pallas": jax.jit(lambda xs, w: [vnm_matmul(x, w, implementation="pallas")
                                            for x in xs]),
        "xla": jax.jit(lambda xs, w: [vnm_matmul(x, w, implementation="xla") for x in xs]),
    }
    args = {"dense": (xs, kernel), "pallas_packed": (xs, w),
            "pallas_condensed": (xs, condensed, w.columns), "op_pallas": (xs, w), "xla": (xs, w)}
    times = time_calls({name: (lambda f=f, a=args[name]: f(*a)) for name, f in fns.items()},
                       repeats=repeats)
    row = dict(in_features=k, out_features=n, tokens=t, config=str(w.config),
               dtype=jnp.dtype(dtype).name, device=jax.devices()[0].device_kind,
               **{f"{name}_ms": times[name] / calls_per_run * 1e3 for name in fns})
    rows.append(row)
    print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                   for key, value in row.items()), flush=True)
  return rows


def run_tune(shape, tokens, config, *, dtype, repeats, calls_per_run) -> list[dict]:
  """Both kernels' block sizes, warps and K splits on one problem, against dense in the same run."""
  k, n = shape
  key_w, key_x = jax.random.split(jax.random.key(0))
  kernel = jax.random.normal(key_w, (k, n), jnp.float32).astype(dtype)
  w = compress(kernel, config)
  xs = [jax.random.normal(key, (tokens, k), jnp.float32).astype(dtype)
        for key in jax.random.split(key_x, calls_per_run)]
  variants = {"dense": jax.jit(lambda xs, w: [jnp.dot(x, kernel) for x in xs])}
  condensed = condense(w.values, w.meta)
  if tokens > 64:
    choices = itertools.product((128, 256), (16, 32), (4, 8), (3,), (None,))
  else:  # Decode: one token tile; the K split decides how many programs run.
    choices = itertools.product((max(16, 1 << (tokens - 1).bit_length()),), (32, 64), (4,),
                                (3,), (None, 1, 4))
  for block_tokens, block_groups, num_warps, num_stages, k_splits in choices:
    if block_tokens == 256 and num_warps == 4:
      continue
    options = dict(block_tokens=block_tokens, block_groups=block_groups, num_warps=num_warps,
                   num_stages=num_stages, k_splits=k_splits)
    variants["packed " + json.dumps(options)] = jax.jit(lambda xs, w, options=options: [
        vnm_matmul_pallas_packed(x, w.values, w.meta, w.columns, m=w.config.m, **options)
        for x in xs])
    variants["condensed " + json.dumps(options)] = jax.jit(lambda xs, w, options=options: [
        vnm_matmul_pallas_condensed(x, condensed, w.columns, m=w.config.m, **options)
        for x in xs])
  times = {}
  for name, fn in variants.items():
    try:
      times.update(time_calls({name: lambda fn=fn: fn(xs, w), "dense": lambda: variants["dense"](
          xs, w)}, repeats=repeats))
    except Exception as error:  # A block choice the lowering rejects is reported, not fatal.
      print(f"{name}: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
      continue
    print(f"{name}: {times[name] / calls_per_run * 1e3:.4f} ms (dense "
          f"{times['dense'] / calls_per_run * 1e3:.4f} ms)", flush=True)
  return [dict(variant=name, ms=value / calls_per_run * 1e3) for name, value in times.items()]


def run_tune_xla(shape, tokens, config, *, dtype, repeats) -> list[dict]:
  """The XLA path's row blocks per lax.map step, against dense in the same run."""
  k, n = shape
  key_w, key_x = jax.random.split(jax.random.key(0))
  kernel = jax.random.normal(key_w, (k, n), jnp.float32).astype(dtype)
  w = compress(kernel, config)
  x = jax.random.normal(key_x, (tokens, k), jnp.float32).astype(dtype)
  width = w.values.shape[2] * w.config.m
  fns = {"dense": jax.jit(jnp.dot)}
  for blocks in (1, 2, 4, 8):
    fns[f"blocks_per_step={blocks}"] = jax.jit(lambda x, w, blocks=blocks: matmul_blocks(
        jnp.pad(x, ((0, 0), (0, width - k))), w.values, w.meta, w.columns,
        blocks_per_step=blocks))
  args = {name: (x, kernel) if name == "dense" else (x, w) for name in fns}
  times = time_calls({name: (lambda f=f, a=args[name]: f(*a)) for name, f in fns.items()},
                     repeats=repeats)
  for name, value in times.items():
    print(f"{name}: {value * 1e3:.2f} ms, dense/this {times['dense'] / value:.2f}x", flush=True)
  return [dict(variant=name, ms=value * 1e3) for name, value in times.items()]


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=None,
                      help="model shape sets to run (default: all)")
  parser.add_argument("--shapes", nargs="+", type=_shape, default=None,
                      help="weight shapes IN x OUT, e.g. 4096x4096 (instead of --models)")
  parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
  parser.add_argument("--implementation", choices=("pallas", "xla"), default=None,
                      help="V:N:M path (default: Pallas on a GPU, XLA elsewhere)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--calls-per-run", type=int, default=None,
                      help="matmuls per timed call, each on its own x (default 16 on GPU, 1 else)")
  parser.add_argument("--layouts", action="store_true", help="compare the Pallas weight layouts")
  parser.add_argument("--tune", action="store_true", help="time the kernel's block sizes")
  parser.add_argument("--tune-xla", action="store_true",
                      help="time the XLA path's row blocks per step")
  parser.add_argument("--out-dir", default="bench/results",
                      help="where kernel_<dtype>.json and .md are written")
  args = parser.parse_args(argv)

  shapes = args.shapes or [s for model in (args.models or sorted(MODEL_SHAPES))
                           for s in MODEL_SHAPES[model]]
  dtype = jnp.dtype(args.dtype)
  calls_per_run = args.calls_per_run or (16 if jax.default_backend() == "gpu" else 1)
  os.makedirs(args.out_dir, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}"
  print(f"device: {device}", flush=True)
  if args.layouts:
    records = run_layouts(shapes, args.tokens, args.configs[0], dtype=dtype,
                          repeats=args.repeats, calls_per_run=calls_per_run)
    name = f"layouts_{args.dtype}"
  elif args.tune_xla:
    records = run_tune_xla(shapes[0], args.tokens[0], args.configs[0], dtype=dtype,
                           repeats=args.repeats)
    name = f"tune_xla_{args.dtype}"
  elif args.tune:
    records = run_tune(shapes[0], args.tokens[0], args.configs[0], dtype=dtype,
                       repeats=args.repeats, calls_per_run=calls_per_run)
    name = f"tune_{args.dtype}"
  else:
    name = f"kernel_{args.dtype}"

    def save(records):
      table = markdown_table(records)
      with open(os.path.join(args.out_dir, f"{name}.md"), "w") as f:
        f.write(f"device: {device}\n\n{table}\n")
      with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
        json.dump({"device": device, "argv": argv, "records": records}, f, indent=1)

    records = run_sweep(shapes, args.tokens, args.configs, dtype=dtype,
                        implementation=args.implementation, repeats=args.repeats,
                        calls_per_run=calls_per_run, save=save)
    print(markdown_table(records))
    return records
  with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
    json.dump({"device": device, "argv": argv, "records": records}, f, indent=1)
  return records


if __name__ == "__main__":
  main()
