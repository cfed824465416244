"""Time to compute V:N:M masks of a large kernel on this machine, both rules, jitted.

    python bench/masks.py                       # 4096 x 11008 at 64:2:8 (the issue's shape)
    python bench/masks.py --shape 4096 4096 --config 64:2:5 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from vnm_jax import VNMConfig, vnm_mask
from vnm_jax.masks import RULES
from vnm_recipes.checks import ArgumentParser, config_argument, positive_int_argument


def time_mask(kernel: jax.Array, config: VNMConfig, rule: str, repeats: int) -> tuple[float, float]:
  """Returns (first call incl. compile, median of later calls) in seconds."""
  fn = jax.jit(lambda w: vnm_mask(w, config, rule=rule))
  start = time.perf_counter()
  fn(kernel).block_until_ready()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(kernel).block_until_ready()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main(argv=None) -> list[dict]:
  parser = ArgumentParser(prog="python bench/masks.py", description=__doc__,
                          formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--shape", type=positive_int_argument, nargs=2, default=(4096, 11008),
                      metavar=("IN", "OUT"))
  parser.add_argument("--config", type=config_argument, default=VNMConfig.parse("64:2:8"))
  parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
  parser.add_argument("--repeats", type=positive_int_argument, default=3)
  args = parser.parse_args(argv)
  config = args.config
  kernel = jax.random.normal(jax.random.key(0), tuple(args.shape), jnp.float32)
  rows = []
  print(f"| kernel (in, out) | config | rule | first call (s) | median (s) |")
  print(f"|---|---|---|---|---|")
  for rule in args.rules:
    first, median = time_mask(kernel, config, rule, args.repeats)
    rows.append(dict(shape=tuple(args.shape), config=str(config), rule=rule, first_s=first,
                     median_s=median))
    print(f"| {args.shape[0]} x {args.shape[1]} | {config} | {rule} | {first:.2f} | {median:.2f} |",
          flush=True)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  return rows


if __name__ == "__main__":
  main()
