"""The results of the ViT pipeline: one record per variant, the table, the JSON and the plot."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from flax import nnx

from vnm_jax import Permutation

METHODS = ("one-shot", "fixed-mask", "sr-ste")
# Largest allowed drop (test accuracy points) of the best fine-tuned model below dense.
TARGET_POINTS = {"64:2:5": 0.5, "64:2:8": 1.5}


@dataclasses.dataclass(frozen=True)
class VariantResult:
  """One row of the results table.

  Attributes:
    config: the V:N:M config, "V:N:M".
    permuted: whether channel permutations were searched before pruning.
    method: "one-shot" (prune the dense model), "fixed-mask" (fine-tune with the
      one-shot mask fixed) or "sr-ste" (fine-tune with SR-STE, mask recomputed every step).
    test_accuracy: top-1 accuracy in [0, 1] on the 360 test images.
    speedup: dense / V:N:M time of the model's pruned GEMMs (block 0's compressed
      weights, this config and permutation), measured in this run on this device.
    seconds: wall time of this method: one-shot: permutation search, masks and speed
      measurement; fine-tuning: its training (compilation included).
  """

  config: str
  permuted: bool
  method: str
  test_accuracy: float
  speedup: float
  seconds: float


@dataclasses.dataclass
class SparseModel:
  """A pruned model of one variant, in original (unpermuted) coordinates.

  Attributes:
    params: the pruned params (`nnx.State`); pruned entries are exactly zero.
    masks: the params' structure, a bool mask at every pruned kernel, None elsewhere.
    permutations: kernel path -> `Permutation` the masks' groups were formed on (empty
      without permutation).
  """

  params: Any
  masks: Any
  permutations: dict[str, Permutation]


@dataclasses.dataclass
class PipelineResult:
  """Outcome of `run_pipeline`.

  Attributes:
    preset: the preset's name.
    device: the device kind the speedups were measured on.
    dense_accuracy: test accuracy in [0, 1] of the dense model.
    dense_params: the dense model's params (`nnx.State`).
    dense_seconds: wall time of the dense training.
    variants: one `VariantResult` per (config, permuted, method).
    timings: "config|permuted" -> the `MatmulTiming.as_dict()` of each timed GEMM.
    models: (config, permuted, method) -> its `SparseModel`.
    graphdef: the ViT's structure (`nnx.split`), for `models`' params.
    table_path, json_path, plot_path: files written.
  """

  preset: str
  device: str
  dense_accuracy: float
  dense_params: Any
  dense_seconds: float
  variants: list[VariantResult]
  timings: dict[str, list[dict]]
  models: dict[tuple[str, bool, str], SparseModel]
  graphdef: nnx.GraphDef
  table_path: pathlib.Path
  json_path: pathlib.Path
  plot_path: pathlib.Path

  def to_markdown(self) -> str:
    """The results table (accuracies in %, differences in points)."""
    lines = [f"Dense test accuracy {100 * self.dense_accuracy:.2f} % (preset {self.preset!r}; "
             f"speedups measured on {self.device}).", "",
             "| config | permutation | method | test acc (%) | vs dense (points) | GEMM speedup |",
             "|---|---|---|---|---|---|"]
    for row in self.variants:
      lines.append(f"| {row.config} | {'yes' if row.permuted else 'no'} | {row.method} | "
                   f"{100 * row.test_accuracy:.2f} | "
                   f"{100 * (row.test_accuracy - self.dense_accuracy):+.2f} | "
                   f"{row.speedup:.2f}x |")
    lines += ["", *self.target_lines()]
    return "\n".join(lines)

  def target_lines(self) -> list[str]:
    """Whether the best fine-tuned accuracy of 64:2:5 / 64:2:8 meets the issue's targets."""
    lines = []
    for config, allowed in TARGET_POINTS.items():
      tuned = [row for row in self.variants if row.config == config and row.method != "one-shot"]
      if not tuned:
        continue
      best = max(tuned, key=lambda row: row.test_accuracy)
      gap = 100 * (self.dense_accuracy - best.test_accuracy)
      verdict = "met" if gap <= allowed else "NOT met"
      lines.append(f"- {config}: best fine-tuned {100 * best.test_accuracy:.2f} % ({best.method}, "
                   f"permutation {'yes' if best.permuted else 'no'}), {-gap:+.2f} points vs "
                   f"dense; target: at most {allowed} points below: {verdict}.")
    return lines

  def as_dict(self) -> dict:
    """A JSON-ready dict of everything but the models."""
    return {"preset": self.preset, "device": self.device,
            "dense_accuracy": self.dense_accuracy, "dense_seconds": self.dense_seconds,
            "variants": [dataclasses.asdict(row) for row in self.variants],
            "timings": self.timings, "targets": self.target_lines()}


def write_results(result: PipelineResult) -> None:
  """Writes the table (markdown), the JSON and the plot to the result's paths."""
  result.table_path.write_text(result.to_markdown() + "\n")
  result.json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
  plot_accuracy_vs_speedup(result, result.plot_path)


def plot_accuracy_vs_speedup(result: PipelineResult, path: str | os.PathLike) -> None:
  """Scatter of test accuracy against measured GEMM speedup, one point per variant.

  Colour: config; marker: method; filled: with permutation, hollow: without. The dense
  model is the dashed line (and the star at speedup 1).
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  markers = {"one-shot": "o", "fixed-mask": "s", "sr-ste": "^"}
  configs = list(dict.fromkeys(row.config for row in result.variants))
  colours = dict(zip(configs, plt.get_cmap("tab10").colors))
  figure, axes = plt.subplots(figsize=(8.5, 4.5))
  axes.axhline(100 * result.dense_accuracy, color="black", linestyle="--", linewidth=1)
  axes.scatter([1.0], [100 * result.dense_accuracy], marker="*", s=160, color="black",
               label=f"dense {100 * result.dense_accuracy:.2f} %")
  for row in result.variants:
    colour = colours[row.config]
    axes.scatter([row.speedup], [100 * row.test_accuracy], marker=markers[row.method], s=60,
                 edgecolors=colour, facecolors=colour if row.permuted else "none", linewidths=1.5)
  for config in configs:
    axes.scatter([], [], marker="o", color=colours[config], label=config)
  for method, marker in markers.items():
    axes.scatter([], [], marker=marker, edgecolors="grey", facecolors="none", label=method)
  axes.scatter([], [], marker="o", color="grey", label="filled: with permutation")
  axes.set_xlabel(f"GEMM speedup over dense, measured on {result.device}")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(f"ViT on digits, V:N:M pruning (preset {result.preset!r})")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
