"""The results of the ViT pipeline: one record per variant and seed, their summary over
seeds (mean and sample standard deviation), the table, the JSON and the plot.

Every accuracy difference is taken against the *same-budget* dense model of the same
seed (the dense model trained on for the fine-tuning's epochs with its optimizer,
`vnm_recipes.vit.training.train_same_budget`), then averaged over seeds: paired
differences, so the seed-to-seed spread of the dense models does not blur them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
from typing import Any, Sequence

from flax import nnx

from vnm_jax import Permutation

METHODS = ("one-shot", "fixed-mask", "sr-ste")
# Largest allowed drop (test accuracy points) of the best fine-tuned model (mean over seeds)
# below the same-budget dense model.
TARGET_POINTS = {"64:2:5": 0.5, "64:2:8": 1.5}


@dataclasses.dataclass(frozen=True)
class VariantResult:
  """One variant of one seed.

  Attributes:
    config: the V:N:M config, "V:N:M".
    permuted: whether channel permutations were searched before pruning.
    method: "one-shot" (prune the dense model), "fixed-mask" (fine-tune with the
      one-shot mask fixed) or "sr-ste" (fine-tune with SR-STE, mask recomputed every step).
    test_accuracy: top-1 accuracy in [0, 1] on the test images.
    speedup: dense / V:N:M time of the model's pruned GEMMs (block 0's compressed
      weights, this config and permutation), measured in this run on this device.
    seconds: wall time of this method: one-shot: permutation search, masks and speed
      measurement; fine-tuning: its training (compilation included).
    steps: optimizer steps of the fine-tuning (0 for one-shot); equal to the same-budget
      dense model's.
  """

  config: str
  permuted: bool
  method: str
  test_accuracy: float
  speedup: float
  seconds: float
  steps: int = 0


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
class SeedResult:
  """Everything one seed produced. The first fields are saved (`as_dict`, `from_dict`:
  a finished seed is not run again); the models only live in the process that trained them.

  Attributes:
    seed: seed of the dense training and of every fine-tuning.
    dense_accuracy: test accuracy in [0, 1] of the dense model (the pruning's start).
    same_budget_accuracy: test accuracy of the dense model trained on with the
      fine-tuning's budget (the baseline of every "vs dense" difference).
    dense_seconds, same_budget_seconds: their training wall times.
    same_budget_steps: optimizer steps of the same-budget training.
    variants: one `VariantResult` per (config, permuted, method).
    timings: "config|permuted" -> the `MatmulTiming.as_dict()` of each timed GEMM.
    dense_params, same_budget_params: the two dense models' params (`nnx.State`).
    models: (config, permuted, method) -> its `SparseModel`.
  """

  seed: int
  dense_accuracy: float
  same_budget_accuracy: float
  dense_seconds: float
  same_budget_seconds: float
  same_budget_steps: int
  variants: list[VariantResult]
  timings: dict[str, list[dict]]
  dense_params: Any = None
  same_budget_params: Any = None
  models: dict[tuple[str, bool, str], SparseModel] = dataclasses.field(default_factory=dict)

  _SAVED = ("seed", "dense_accuracy", "same_budget_accuracy", "dense_seconds",
            "same_budget_seconds", "same_budget_steps", "timings")

  def as_dict(self) -> dict:
    """The saved fields, JSON-ready."""
    return {**{name: getattr(self, name) for name in self._SAVED},
            "variants": [dataclasses.asdict(row) for row in self.variants]}

  @classmethod
  def from_dict(cls, saved: dict) -> SeedResult:
    """The inverse of `as_dict` (no params or models)."""
    return cls(**{name: saved[name] for name in cls._SAVED},
               variants=[VariantResult(**row) for row in saved["variants"]])


@dataclasses.dataclass(frozen=True)
class Summary:
  """One row of the table: a quantity over seeds.

  Attributes:
    label: (config, permutation, method) cells of the row.
    accuracies: test accuracy of each seed, in [0, 1].
    differences: accuracy minus the same-budget dense accuracy of the same seed, per seed.
    speedups: the measured GEMM speedup of each seed.
  """

  label: tuple[str, str, str]
  accuracies: tuple[float, ...]
  differences: tuple[float, ...]
  speedups: tuple[float, ...]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation) of values; the deviation is None for one value."""
  values = list(values)
  if not values:
    raise ValueError("mean_std needs at least one value")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _points(values: Sequence[float], sign: bool = False) -> str:
  """Mean (± sample std when there are several seeds) of fractions, in percent points."""
  mean, std = mean_std([100 * v for v in values])
  text = f"{mean:+.2f}" if sign else f"{mean:.2f}"
  return text if std is None else f"{text} ± {std:.2f}"


@dataclasses.dataclass
class PipelineResult:
  """Outcome of `run_pipeline`: the seeds' results and their summary.

  Attributes:
    preset: the preset's name.
    dataset: the data set's name ("digits", "fashion_mnist").
    device: the device kind the speedups were measured on.
    finetune_epochs: epochs of every fine-tuning and of the same-budget dense training.
    dense_epochs: epochs of the dense training.
    seeds: one `SeedResult` per seed, in seed order.
    graphdef: the ViT's structure (`nnx.split`), for the seeds' params and models.
    table_path, json_path, plot_path: files written.
  """

  preset: str
  dataset: str
  device: str
  finetune_epochs: int
  dense_epochs: int
  seeds: list[SeedResult]
  graphdef: nnx.GraphDef | None
  table_path: pathlib.Path
  json_path: pathlib.Path
  plot_path: pathlib.Path

  def dense_rows(self) -> list[Summary]:
    """The original dense model and the same-budget one (the baseline: difference 0)."""
    base = [s.same_budget_accuracy for s in self.seeds]
    dense = [s.dense_accuracy for s in self.seeds]
    ones = tuple(1.0 for _ in self.seeds)
    return [
        Summary(("dense", "-", f"original ({self.dense_epochs} epochs)"), tuple(dense),
                tuple(d - b for d, b in zip(dense, base)), ones),
        Summary(("dense", "-", f"same budget (+{self.finetune_epochs} epochs)"), tuple(base),
                tuple(0.0 for _ in base), ones)]

  def variant_rows(self) -> list[Summary]:
    """One row per (config, permuted, method) present in every seed, in run order."""
    keys = [(r.config, r.permuted, r.method) for r in self.seeds[0].variants]
    by_seed = [{(r.config, r.permuted, r.method): r for r in s.variants} for s in self.seeds]
    rows = []
    for key in keys:
      if not all(key in found for found in by_seed):
        continue
      runs = [found[key] for found in by_seed]
      rows.append(Summary(
          (key[0], "yes" if key[1] else "no", key[2]),
          tuple(r.test_accuracy for r in runs),
          tuple(r.test_accuracy - s.same_budget_accuracy for r, s in zip(runs, self.seeds)),
          tuple(r.speedup for r in runs)))
    return rows

  def permutation_effects(self) -> list[tuple[str, str, tuple[float, ...]]]:
    """(config, method, per-seed accuracy with permutation minus without)."""
    rows = {(r.label[0], r.label[2], r.label[1]): r.accuracies for r in self.variant_rows()}
    return [(config, method, tuple(a - b for a, b in zip(with_, rows[(config, method, "no")])))
            for (config, method, permuted), with_ in rows.items()
            if permuted == "yes" and (config, method, "no") in rows]

  def to_markdown(self) -> str:
    """The results table (accuracies in %, differences in points), the permutation's
    effect, and the targets."""
    seeds = ", ".join(str(s.seed) for s in self.seeds)
    spread = "mean ± sample standard deviation over" if len(self.seeds) > 1 else "one run,"
    lines = [f"ViT on {self.dataset} (preset {self.preset!r}): {spread} seed(s) {seeds}; "
             f"differences are paired per seed against the dense model trained "
             f"{self.finetune_epochs} more epochs with the fine-tuning's optimizer (\"dense, "
             f"same budget\"); speedups measured on {self.device}.", "",
             "| config | permutation | method | test acc (%) | vs dense, same budget (points) "
             "| GEMM speedup | per seed (%) |", "|---|---|---|---|---|---|---|"]
    for row in self.dense_rows() + self.variant_rows():
      speed_mean, _ = mean_std(row.speedups)
      versus = ("baseline" if row.label[2].startswith("same budget")
                else _points(row.differences, sign=True))
      lines.append(f"| {' | '.join(row.label)} | {_points(row.accuracies)} | {versus} | "
                   f"{speed_mean:.2f}x | "
                   + " / ".join(f"{100 * a:.2f}" for a in row.accuracies) + " |")
    effects = self.permutation_effects()
    if effects:
      lines += ["", "Permutation's effect (accuracy with minus without, points, paired per seed):",
                "", "| config | method | effect (points) |", "|---|---|---|"]
      lines += [f"| {config} | {method} | {_points(diffs, sign=True)} |"
                for config, method, diffs in effects]
    lines += ["", *self.target_lines()]
    return "\n".join(lines)

  def target_lines(self) -> list[str]:
    """Whether the best fine-tuned 64:2:5 / 64:2:8 (by mean accuracy) is within the
    issue's targets of the same-budget dense model (mean of the paired differences)."""
    lines = []
    for config, allowed in TARGET_POINTS.items():
      tuned = [row for row in self.variant_rows()
               if row.label[0] == config and row.label[2] != "one-shot"]
      if not tuned:
        continue
      best = max(tuned, key=lambda row: mean_std(row.accuracies)[0])
      gap, _ = mean_std([100 * d for d in best.differences])
      verdict = "met" if -gap <= allowed else "NOT met"
      lines.append(f"- {config}: best fine-tuned {_points(best.accuracies)} % ({best.label[2]}, "
                   f"permutation {best.label[1]}), {_points(best.differences, sign=True)} points "
                   f"vs dense, same budget; target: at most {allowed} points below: {verdict}.")
    return lines

  def as_dict(self) -> dict:
    """A JSON-ready dict: the settings, every seed's results, the summary rows, the targets."""
    summarise = lambda row: {"label": list(row.label), "accuracies": list(row.accuracies),
                             "differences": list(row.differences),
                             "speedups": list(row.speedups)}
    return {"preset": self.preset, "dataset": self.dataset, "device": self.device,
            "dense_epochs": self.dense_epochs, "finetune_epochs": self.finetune_epochs,
            "seeds": [s.as_dict() for s in self.seeds],
            "summary": [summarise(r) for r in self.dense_rows() + self.variant_rows()],
            "permutation_effects": [{"config": c, "method": m, "differences": list(d)}
                                    for c, m, d in self.permutation_effects()],
            "targets": self.target_lines()}


def write_results(result: PipelineResult) -> None:
  """Writes the table (markdown), the JSON and the plot to the result's paths."""
  result.table_path.write_text(result.to_markdown() + "\n")
  result.json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
  plot_accuracy_vs_speedup(result, result.plot_path)


def plot_accuracy_vs_speedup(result: PipelineResult, path: str | os.PathLike) -> None:
  """Test accuracy against measured GEMM speedup, one point per variant: the mean over
  seeds with error bars of one sample standard deviation (both axes).

  Colour: config; marker: method; filled: with permutation, hollow: without. The
  same-budget dense model is the dashed line (its spread shaded), the original dense
  model the dotted one.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  markers = {"one-shot": "o", "fixed-mask": "s", "sr-ste": "^"}
  rows = result.variant_rows()
  configs = list(dict.fromkeys(row.label[0] for row in rows))
  colours = dict(zip(configs, plt.get_cmap("tab10").colors))
  figure, axes = plt.subplots(figsize=(8.5, 4.5))
  original, same_budget = result.dense_rows()
  for row, style in ((original, ":"), (same_budget, "--")):
    mean, std = mean_std([100 * a for a in row.accuracies])
    axes.axhline(mean, color="black", linestyle=style, linewidth=1,
                 label=f"dense, {row.label[2]}: {_points(row.accuracies)} %")
    if std is not None and row is same_budget:
      axes.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
  for row in rows:
    colour = colours[row.label[0]]
    (x, x_err), (y, y_err) = mean_std(row.speedups), mean_std([100 * a for a in row.accuracies])
    axes.errorbar([x], [y], xerr=None if x_err is None else [x_err],
                  yerr=None if y_err is None else [y_err], fmt=markers[row.label[2]],
                  markersize=7, color=colour, ecolor=colour, elinewidth=1, capsize=3,
                  markeredgecolor=colour, markeredgewidth=1.5,
                  markerfacecolor=colour if row.label[1] == "yes" else "none")
  for config in configs:
    axes.scatter([], [], marker="o", color=colours[config], label=config)
  for method, marker in markers.items():
    axes.scatter([], [], marker=marker, edgecolors="grey", facecolors="none", label=method)
  axes.scatter([], [], marker="o", color="grey", label="filled: with permutation")
  axes.set_xlabel(f"GEMM speedup over dense, measured on {result.device}")
  axes.set_ylabel("test accuracy (%)")
  seeds = (f"mean ± std over {len(result.seeds)} seeds" if len(result.seeds) > 1
           else f"seed {result.seeds[0].seed}")
  axes.set_title(f"ViT on {result.dataset}, V:N:M pruning\n(preset {result.preset!r}; {seeds})",
                 fontsize=10)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  figure.tight_layout()
  figure.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits outside the axes
  plt.close(figure)
