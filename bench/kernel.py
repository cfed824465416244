"""V:N:M matmul vs the dense matmul it replaces, through the path users run, in the same run.

For every (weight shape, tokens, config) it times the dense matmul and the V:N:M one
(median of interleaved runs after warm-up, ``block_until_ready``) and reports the
speedup beside its physical limits (``bytes_limit``: dense weight bytes over the bytes
the kernel reads, the bound at decode sizes; ``flops_limit``: M/4, the bound at prefill
sizes), the stored and resident bytes against dense, and the max error against dense
math. The load average is recorded at the start and the end of the run.

Two paths (``--through``):

- ``weight`` (default): ``vnm_matmul(x, prepare(compress(W)))`` jitted against
  ``jnp.dot(x, W)`` (:func:`vnm_jax.benchmarking.measure_matmul_speedup`).
- ``layer``: an ``nnx.Linear`` (with bias) converted with ``convert_to_vnm``, called
  through ``jax.jit`` of ``nnx.merge`` (the pattern of a jitted model), against the
  same ``nnx.Linear``.

``--explore`` instead times the CPU formulations of the XLA implementation on raw
arrays (the exploration recorded in bench/RESULTS.md, "Kernel (issue 9)").

    python bench/kernel.py --shapes 4096x4096 --tokens 1 16 256 --configs 64:2:8 64:2:5 \\
        --through layer --out-dir bench/results/cpu_issue9
    python bench/kernel.py --models llama --tokens 1 16 4096 --dtype bfloat16   # on a GPU
    python bench/kernel.py --explore --shapes 4096x4096 --tokens 1 16 256 --configs 64:2:5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from vnm_jax import compress, convert_to_vnm, vnm_mask
from vnm_jax.benchmarking import kernel_limits, measure_matmul_speedup, time_calls
from vnm_jax.layers import VNMLinear
from vnm_jax.ops.vnm_matmul import layout as vnm_layout, xla

# (in_features, out_features) of the GEMMs of each model.
MODEL_SHAPES = {
    "llama": [(4096, 4096), (4096, 11008), (11008, 4096)],  # Llama-7B attention, MLP up, down
    "deit": [(768, 768), (768, 3072), (3072, 768)],  # DeiT-base attention, MLP up, down
}
DEFAULT_TOKENS = (1, 16, 256)
DEFAULT_CONFIGS = ("2:4", "64:2:5", "64:2:8", "128:2:8")


def _shape(text: str) -> tuple[int, int]:
  try:
    k, n = (int(part) for part in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a shape is IN x OUT like 4096x11008, got {text!r}")
  return k, n


def load_average() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def markdown_table(records: list[dict]) -> str:
  """The records of :func:`run_sweep` as a markdown table."""
  lines = ["| weight (in x out) | tokens | config | dtype | path | kernel | dense (ms) | "
           "V:N:M (ms) | speedup | limit: bytes / FLOPs | stored / resident vs dense | "
           "max rel err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(
        f"| {r['in_features']} x {r['out_features']} | {r['tokens']} | {r['config']} | "
        f"{r['dtype']} | {r['through']} ({r['implementation']}) | {r['kernel']} | "
        f"{r['dense_seconds'] * 1e3:.3f} | {r['vnm_seconds'] * 1e3:.3f} | "
        f"**{r['speedup']:.2f}x** | {r['bytes_limit']:.2f}x / {r['flops_limit']:.2f}x | "
        f"{r['bytes_ratio']:.3f} / {r['resident_bytes'] / r['dense_weight_bytes']:.3f} | "
        f"{r['max_rel_error']:.1e} |")
  return "\n".join(lines)


class _Holder(nnx.Module):
  """A model holding one Linear (convert_to_vnm replaces modules inside a model)."""

  def __init__(self, linear: nnx.Linear):
    self.linear = linear

  def __call__(self, x):
    return self.linear(x)


def measure_layer(k: int, n: int, tokens: int, config: str, *, dtype, implementation, repeats,
                  seed: int = 0) -> dict:
  """An nnx.Linear against the same layer converted with convert_to_vnm, both jitted."""
  dense_model = _Holder(nnx.Linear(k, n, param_dtype=dtype, rngs=nnx.Rngs(seed)))
  kernel = dense_model.linear.kernel[...]
  mask = vnm_mask(kernel, config)
  sparse_model = convert_to_vnm(nnx.clone(dense_model), {"linear/kernel": mask}, config,
                                implementation=implementation)
  layer: VNMLinear = sparse_model.linear

  def jitted(model):
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: call(state, x)

  dense, sparse = jitted(dense_model), jitted(sparse_model)
  x = jax.random.normal(jax.random.key(seed + 1), (tokens, k), jnp.float32).astype(dtype)
  exact = (jnp.dot(x.astype(jnp.float32), (kernel * mask).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
           + dense_model.linear.bias[...].astype(jnp.float32))
  error = float(jnp.max(jnp.abs(sparse(x).astype(jnp.float32) - exact)))
  times = time_calls({"dense": lambda: dense(x), "vnm": lambda: sparse(x)}, repeats=repeats)
  prepared = layer.prepared
  limits = kernel_limits(prepared, tokens)
  return dict(in_features=k, out_features=n, tokens=tokens, config=str(layer.config),
              dtype=jnp.dtype(dtype).name, implementation=prepared.implementation,
              device=jax.devices()[0].device_kind, dense_seconds=times["dense"],
              vnm_seconds=times["vnm"], speedup=times["dense"] / times["vnm"],
              max_abs_error=error,
              max_rel_error=error / max(float(jnp.max(jnp.abs(exact))), 1e-30),
              weight_bytes=prepared.stored_nbytes, dense_weight_bytes=prepared.dense_nbytes,
              bytes_ratio=prepared.stored_nbytes / prepared.dense_nbytes,
              resident_bytes=prepared.nbytes, kernel=limits["kernel"],
              bytes_limit=limits["bytes_limit"], flops_limit=limits["flops_limit"])


def run_sweep(shapes, tokens, configs, *, dtype, implementation, repeats, through,
              calls_per_run=None, save=lambda records: None) -> list[dict]:
  """The cross product of shapes, configs and token counts; one record dict per point.

  ``save(records)`` runs after every point, so that a run cut short keeps what it measured.
  """
  records = []
  progress = tqdm(total=len(shapes) * len(tokens) * len(configs), desc="kernel bench",
                  unit="point")
  for (k, n), config in itertools.product(shapes, configs):
    weight = None
    if through == "weight":
      kernel = jax.random.normal(jax.random.key(0), (k, n), jnp.float32).astype(dtype)
      weight = compress(kernel, config)
    for t in tokens:
      if through == "weight":
        record = measure_matmul_speedup(k, n, t, config, dtype=dtype,
                                        implementation=implementation, repeats=repeats,
                                        calls_per_run=calls_per_run, weight=weight).as_dict()
      else:
        record = measure_layer(k, n, t, config, dtype=dtype, implementation=implementation,
                               repeats=repeats)
      record["through"] = through
      records.append(record)
      save(records)
      progress.update()
      tqdm.write(f"{k}x{n} tokens={t} {record['config']}: dense "
                 f"{record['dense_seconds'] * 1e3:.3f} ms, vnm {record['vnm_seconds'] * 1e3:.3f}"
                 f" ms, {record['speedup']:.2f}x (limits {record['bytes_limit']:.2f}x bytes, "
                 f"{record['flops_limit']:.2f}x FLOPs)")
  progress.close()
  return records


def explore_formulations(shape, tokens, config, *, repeats: int) -> list[dict]:
  """CPU formulations of the XLA implementation on raw arrays, against dense, in one run.

  "batched" and "blocks<B>" are the shipped formulations on the prepared condensed
  weight; "select" reads only the stored values (x picked per value by its 2-bit
  position, fused into the reduction; positions unpacked to one byte per value
  beforehand), "gather" gathers x per stored value (an int32 index per value).
  """
  k, n = shape
  w = compress(jax.random.normal(jax.random.key(0), (k, n), jnp.float32), config)
  r, _, g, v = w.values.shape
  m = w.config.m
  condensed, columns = xla.condensed_weight(w.values, w.meta), xla.flat_columns(w.columns)
  pos8 = vnm_layout.positions(w.meta, v).astype(jnp.uint8)
  inputs = vnm_layout.value_inputs(w.meta, w.columns, v)
  kernel = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)

  def pad(x):
    return jnp.pad(x, ((0, 0), (0, g * m - k)))

  def select(x, values, pos):  # One token: the select costs a pass per token.
    xc = pad(x)[0][w.columns]  # (R, 4, G)
    slot = [xc[:, None, p, :, None] for p in range(4)]
    picked = jnp.where(pos < 2, jnp.where(pos == 0, slot[0], slot[1]),
                       jnp.where(pos == 2, slot[2], slot[3]))
    return jnp.sum(values * picked, axis=(1, 2)).reshape(1, -1)

  def gather(x, values, inputs):
    return jnp.sum(values * pad(x)[0][inputs], axis=(1, 2)).reshape(1, -1)

  rows = []
  for t in tokens:
    x = jax.random.normal(jax.random.key(t), (t, k), jnp.float32)
    fns = {"dense": (jnp.dot, (x, kernel)),
           "batched": (lambda x, c, cl: xla.matmul_batched(pad(x), c, cl),
                       (x, condensed, columns))}
    for blocks in (1, 2, 4, 8):
      fns[f"blocks{blocks}"] = (lambda x, c, cl, b=blocks: xla.matmul_blocks(
          pad(x), c, cl, blocks_per_step=b), (x, condensed, columns))
    if t == 1:
      fns["select"] = (select, (x, w.values, pos8))
      fns["gather"] = (gather, (x, w.values, inputs))
    jitted = {name: jax.jit(fn) for name, (fn, _) in fns.items()}
    times = time_calls({name: (lambda f=f, a=fns[name][1]: f(*a)) for name, f in jitted.items()},
                       repeats=repeats)
    row = dict(shape=f"{k}x{n}", tokens=t, config=str(w.config),
               **{f"{name}_ms": value * 1e3 for name, value in times.items()},
               **{f"{name}_speedup": times["dense"] / value for name, value in times.items()})
    rows.append(row)
    print(f"{k}x{n} {w.config} T={t}: " + "  ".join(
        f"{name} {times[name] * 1e3:.2f} ms ({times['dense'] / times[name]:.2f}x)"
        for name in times), flush=True)
  return rows


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=None,
                      help="model shape sets to run (default: llama)")
  parser.add_argument("--shapes", nargs="+", type=_shape, default=None,
                      help="weight shapes IN x OUT, e.g. 4096x4096 (instead of --models)")
  parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
  parser.add_argument("--implementation", choices=("pallas", "xla"), default=None,
                      help="V:N:M implementation (default: Pallas on a GPU, XLA elsewhere)")
  parser.add_argument("--through", choices=("weight", "layer"), default="weight",
                      help="time prepared weights (vnm_matmul) or converted nnx.Linear layers")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--calls-per-run", type=int, default=None,
                      help="matmuls per timed call, each on its own x (default 16 on GPU, 1 "
                           "else; --through weight only)")
  parser.add_argument("--explore", action="store_true",
                      help="time the XLA formulations on raw arrays (first shape and config)")
  parser.add_argument("--out-dir", default="bench/results/kernel",
                      help="where kernel_<dtype>.json and .md (or explore_*.json) are written")
  args = parser.parse_args(argv)

  shapes = args.shapes or [s for model in (args.models or ["llama"]) for s in MODEL_SHAPES[model]]
  dtype = jnp.dtype(args.dtype)
  os.makedirs(args.out_dir, exist_ok=True)
  device = f"{jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}"
  header = dict(device=device, command=" ".join(["python bench/kernel.py", *(
      sys.argv[1:] if argv is None else argv)]), load_average_start=load_average())
  print(f"device: {device}; load average {header['load_average_start']}", flush=True)
  if args.explore:
    records = explore_formulations(shapes[0], args.tokens, args.configs[0],
                                   repeats=args.repeats)
    path = os.path.join(args.out_dir, f"explore_{args.configs[0].replace(':', '-')}.json")
    with open(path, "w") as f:
      json.dump({**header, "load_average_end": load_average(), "records": records}, f, indent=1)
    return records
  name = f"kernel_{args.dtype}"

  def save(records, final=False):
    end = load_average() if final else "(run in progress)"
    with open(os.path.join(args.out_dir, f"{name}.md"), "w") as f:
      f.write(f"device: {device}\n\ncommand: `{header['command']}`\n\nload average: start "
              f"{header['load_average_start']}, end {end}\n\n{markdown_table(records)}\n")
    with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
      json.dump({**header, "load_average_end": end, "records": records}, f, indent=1)

  records = run_sweep(shapes, args.tokens, args.configs, dtype=dtype,
                      implementation=args.implementation, repeats=args.repeats,
                      through=args.through, calls_per_run=args.calls_per_run, save=save)
  save(records, final=True)
  print(markdown_table(records))
  return records


if __name__ == "__main__":
  main()
