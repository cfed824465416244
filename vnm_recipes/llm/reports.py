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
