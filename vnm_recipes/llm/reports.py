"""The LLM recipe's results: one JSON record per run appended to a file, and its table."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_record(results: str | os.PathLike, record: dict) -> dict:
  """Appends ``record`` as one JSON line to ``results`` (created with its folder) and prints it."""
  results = Path(results)
  results.parent.mkdir(parents=True, exist_ok=True)
  with results.open("a") as sink:
    sink.write(json.dumps(record) + "\n")
  print(json.dumps(record))
  return record


def read_records(results: str | os.PathLike) -> list[dict]:
  """The records of a results file, oldest first."""
  return [json.loads(line) for line in Path(results).read_text().splitlines() if line]


def results_table(rows: list[dict]) -> str:
  """A markdown table of the records, with each run's NLL gap to the dense model's.

  The gap is taken against the dense record measured on the same number of evaluation
  tokens (empty when there is none).
  """
  dense = {r["eval_tokens"]: r["nll"] for r in rows if r["recipe"] == "dense"}
  lines = ["| recipe | pattern | score | permuted | eval tokens | ppl | mean NLL | NLL - dense |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    score = r.get("score", r.get("mask_score", ""))
    gap = (f"{r['nll'] - dense[r['eval_tokens']]:.3f}" if r["eval_tokens"] in dense else "")
    lines.append(f"| {r['recipe']} | {r.get('pattern', '')} | {score} | "
                 f"{r.get('permuted', '')} | {r['eval_tokens']} | {r['ppl']:.4g} | "
                 f"{r['nll']:.4f} | {gap} |")
  return "\n".join(lines)


# The study's methods, in the order of the table and the legend.
STUDY_METHODS = ("dense", "one-shot", "one-shot + permutation", "per-layer allocation",
                 "per-layer allocation + permutation", "three-stage LoRA",
                 "per-layer allocation + LoRA")


def _study_rows(rows: list[dict]) -> list[dict]:
  """The study's records (those with a "method"), last one of each (method, pattern)."""
  latest = {}
  for r in rows:
    if "method" in r:
      latest[(r["method"], r.get("pattern"), r["eval_tokens"], r.get("dtype"))] = r
  order = {m: i for i, m in enumerate(STUDY_METHODS)}
  return sorted(latest.values(), key=lambda r: (order.get(r["method"], 99), -r["density"]))


def study_table(rows: list[dict]) -> str:
  """Markdown: method, pattern, density, perplexity, NLL, NLL gap to dense, and for LoRA and
  allocation rows the share of the plain one-shot gap (same pattern / density) closed."""
  study = _study_rows(rows)
  dense = {(r["eval_tokens"], r.get("dtype")): r["nll"] for r in study if r["method"] == "dense"}
  one_shot = {(r["pattern"], r["eval_tokens"], r.get("dtype")): r["nll"] for r in study
              if r["method"] == "one-shot"}
  lines = ["| method | pattern | density | ppl | mean NLL | NLL - dense | one-shot gap closed |",
           "|---|---|---|---|---|---|---|"]
  for r in study:
    base = dense.get((r["eval_tokens"], r.get("dtype")))
    gap = "" if base is None else f"{r['nll'] - base:.3f}"
    pattern = r["pattern"].split(" @ ")[-1] if " @ " in r["pattern"] else r["pattern"]
    reference = one_shot.get((pattern, r["eval_tokens"], r.get("dtype")))
    closed = ""
    if r["method"] not in ("dense", "one-shot") and base is not None and reference is not None:
      closed = f"{(reference - r['nll']) / (reference - base):.0%}"
    lines.append(f"| {r['method']} | {r['pattern']} | {r['density']:.4f} | {r['ppl']:.4g} | "
                 f"{r['nll']:.4f} | {gap} | {closed} |")
  return "\n".join(lines)


def plot_study(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
  """Perplexity (log) against density, one line per method, dense as a dashed line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  study = _study_rows(rows)
  figure, axes = plt.subplots(figsize=(7, 4.5))
  markers = dict(zip(STUDY_METHODS[1:], "osDd^v"))
  for method in STUDY_METHODS[1:]:
    points = sorted((r["density"], r["ppl"], r["pattern"]) for r in study
                    if r["method"] == method)
    if not points:
      continue
    xs, ys, labels = zip(*points)
    axes.plot(xs, ys, marker=markers[method], label=method)
    for x, y, label in zip(xs, ys, labels):
      if " @ " not in label:
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  for r in study:
    if r["method"] == "dense":
      axes.axhline(r["ppl"], color="black", linestyle="--", linewidth=1,
                   label=f"dense ({r['ppl']:.3g})")
  axes.set_yscale("log")
  axes.set_xlabel("density of the pruned projections (kept share)")
  axes.set_ylabel("perplexity (held-out split)")
  axes.set_title(title, fontsize=9)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(fontsize=8)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path
