"""The LLM study: perplexity against density for one-shot, permutation, LoRA and allocation.

One process loads the model once and measures on the held-out split (all 20,480 tokens by
default): the dense model; one-shot masks (`score`, Wanda by default) for each pattern, plain
and after a channel permutation search; a per-layer allocation at several average densities
(sensitivities measured per kernel, `vnm_recipes.llm.allocation`); three-stage LoRA from the
permuted masks for each LoRA pattern (and optionally for the allocation). Every measurement
is one JSON record appended to `results` (`reports.append_record`); `reports.study_table` and
`reports.plot_study` make the table and the plot.

Precision: evaluation and LoRA run in `dtype` (`training.default_dtype`: bfloat16 on a GPU,
float32 on the CPU); masks, permutations and input norms come from the float32 weights.

Artifacts (input norms, permutations, sensitivities, allocations) are cached in `work_dir`:
a run can be split into chunks (`parts`, and records already in `results` are skipped), and
a GPU run can reuse the permutations a CPU run searched. `deadline_s` bounds a run's wall
time: each LoRA run's steps are cut to what the measured step time says still fits.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vnm_jax
from vnm_jax import Permutation, VNMConfig
from vnm_jax.allocation import allocation_patterns, average_density
from vnm_recipes.data.text import WINDOW, TokenSplit, calibration_batches
from vnm_recipes.llm.allocation import allocate, kernel_sensitivities, kernel_shapes
from vnm_recipes.llm.evaluation import evaluate_perplexity
from vnm_recipes.llm.presets import LoRASettings
from vnm_recipes.llm.pruning import kernel_scores, search_permutations
from vnm_recipes.llm.reports import append_record, read_records
from vnm_recipes.llm.training import cast_floats, default_dtype, train_three_stage_lora
from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama

PARTS = ("grid", "allocation", "lora")
ALLOCATION = "allocation"  # in lora_patterns: LoRA on the allocation at allocation_densities[0]


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """One study.

  Attributes:
    patterns: the uniform patterns of the one-shot grid.
    score: the importance of every mask ("wanda", "ria", "magnitude").
    calibration_windows: 512-token training windows for the input norms.
    permutation_seconds: time budget of each kernel's permutation search.
    candidates: the configs the allocation chooses from.
    sensitivity_windows: calibration windows of the sensitivity batch.
    sensitivity_length: tokens per sensitivity window (<= 512).
    allocation_densities: the average densities of the allocations, as numbers or as
      configs (the density that config keeps uniformly).
    lora_patterns: the LoRA runs, in order: patterns (with the one-shot permutation) or
      "allocation" (the allocation at `allocation_densities[0]`, no permutation).
    lora: the LoRA settings of every run.
    eval_tokens: evaluate on the last this many held-out tokens.
    eval_batch_size: windows per evaluation call.
    first_step_seconds: guess of a LoRA step's time for the deadline, before one ran.
    first_compile_seconds: guess of a LoRA step's compile time, likewise.
  """

  patterns: tuple[str, ...] = ("2:4", "64:2:5", "64:2:8")
  score: str = "wanda"
  calibration_windows: int = 8
  permutation_seconds: float = 1.0
  candidates: tuple[str, ...] = ("64:2:4", "64:2:5", "64:2:6", "64:2:8")
  sensitivity_windows: int = 2
  sensitivity_length: int = 512
  allocation_densities: tuple[str | float, ...] = ("64:2:5", "64:2:6", "64:2:8")
  lora_patterns: tuple[str, ...] = ("64:2:5", "64:2:8", "2:4")
  lora: LoRASettings = LoRASettings()
  eval_tokens: int = 20480
  eval_batch_size: int = 2
  first_step_seconds: float = 10.0
  first_compile_seconds: float = 60.0


PRESETS: dict[str, StudySettings] = {
    # Fits about 60 minutes on 2 CPU cores (measured: 4 x 256-token LoRA step ~5 s).
    "cpu": StudySettings(
        permutation_seconds=0.4, candidates=("64:2:4", "64:2:5", "64:2:8"),
        sensitivity_windows=1, sensitivity_length=256,
        lora=LoRASettings(steps=120, batch_size=4, sequence_length=256, rank=8,
                          learning_rate=2e-3, update_every=2)),
    # Fits about 7 minutes on one H200 (see bench/gpu_llm.sh for the estimate). The
    # training split has 92,475 tokens: 500 steps of 4 x 512 read it about 11 times, so
    # longer runs would mostly add epochs, not data.
    "gpu": StudySettings(
        permutation_seconds=1.0, sensitivity_windows=4, eval_batch_size=8,
        lora_patterns=("64:2:5", "64:2:8", "2:4", ALLOCATION),
        lora=LoRASettings(steps=500, batch_size=4, sequence_length=512, rank=16, alpha=32.0,
                          learning_rate=5e-4, update_every=5),
        first_step_seconds=0.05, first_compile_seconds=90.0),
}


def _npz_key(path: str) -> str:
  return path.replace("/", ".")


def save_permutations(permutations: dict[str, Permutation], path: Path) -> None:
  """{path: Permutation} as one .npz; an identity order (None) is stored as an empty array."""
  arrays = {f"{_npz_key(kernel)}|{field}": np.asarray(
      np.zeros(0) if getattr(permutation, field) is None else getattr(permutation, field),
      np.int32) for kernel, permutation in permutations.items() for field in ("inputs", "outputs")}
  np.savez_compressed(path, **arrays)


def load_permutations(path: Path) -> dict[str, Permutation]:
  with np.load(path) as data:
    kernels = sorted({key.split("|")[0] for key in data.files})
    orders = {k: [data[f"{k}|{f}"] for f in ("inputs", "outputs")] for k in kernels}
  return {k.replace(".", "/"): Permutation(*[o if o.size else None for o in order])
          for k, order in orders.items()}


def save_split(split: TokenSplit, path: Path) -> None:
  """The training and held-out tokens as one .npz (a GPU run reads them, not the text)."""
  np.savez_compressed(path, train=split.train, eval=split.eval)


def load_split(path: Path) -> TokenSplit:
  with np.load(path) as data:
    return TokenSplit(train=data["train"].astype(np.int32), eval=data["eval"].astype(np.int32))


class _Study:
  """The state of one run (model, caches, records) and its measurements."""

  def __init__(self, settings: StudySettings, model: Llama, split: TokenSplit, work_dir: Path,
               results: Path, dtype, deadline_s: float | None, progress: bool,
               log: Callable[[str], None]):
    self.settings, self.model, self.split = settings, model, split
    self.work_dir, self.results = work_dir, results
    self.dtype, self.progress, self.log = jnp.dtype(dtype), progress, log
    self.start = time.perf_counter()
    self.deadline = None if deadline_s is None else self.start + deadline_s
    self.graphdef, self.params = nnx.split(model)
    self.shapes = kernel_shapes(self.params)
    self.eval_tokens = split.eval[-settings.eval_tokens:]
    self.done = read_records(results) if results.exists() else []
    self.lora_timing: tuple[float, float] | None = None  # (compile s, s per step)
    self.evaluation_seconds = 0.0  # the longest evaluation so far
    self._norms = None

  # --- helpers ---------------------------------------------------------------------------

  def common(self) -> dict[str, Any]:
    return {"eval_tokens": len(self.eval_tokens), "window": WINDOW, "dtype": self.dtype.name,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "score": self.settings.score}

  def recorded(self, **key) -> bool:
    common = self.common()
    return any(all(r.get(k) == v for k, v in {**key, "eval_tokens": common["eval_tokens"],
                                                "dtype": common["dtype"]}.items())
               for r in self.done)

  def record(self, **fields) -> dict:
    record = append_record(self.results, {**self.common(), **fields,
                                          "elapsed_s": round(time.perf_counter() - self.start, 1)})
    self.done.append(record)
    return record

  def evaluate(self, params) -> tuple[float, float, float]:
    start = time.perf_counter()
    model = nnx.merge(self.graphdef, cast_floats(params, self.dtype))
    ppl = evaluate_perplexity(model, self.eval_tokens, batch_size=self.settings.eval_batch_size,
                              progress=self.progress)
    seconds = time.perf_counter() - start
    self.evaluation_seconds = max(self.evaluation_seconds, seconds)
    return ppl.perplexity, ppl.mean_nll, seconds

  @property
  def norms(self) -> dict[str, jax.Array]:
    if self._norms is None:
      cache = self.work_dir / "input_norms.npz"
      if cache.exists():
        with np.load(cache) as data:
          self._norms = {k.replace(".", "/"): jnp.asarray(data[k]) for k in data.files}
      else:
        batches = calibration_batches(self.split.train, self.settings.calibration_windows,
                                      WINDOW, self.settings.eval_batch_size)
        self._norms = vnm_jax.collect_input_norms(
            self.model, [jnp.asarray(b) for b in batches], filter=PRUNABLE_PATTERN,
            progress=self.progress)
        np.savez_compressed(cache, **{_npz_key(k): np.asarray(v) for k, v in self._norms.items()})
    return self._norms

  def _permutation_cache(self, pattern: str) -> Path:
    return self.work_dir / f"permutations_{str(VNMConfig.parse(pattern)).replace(':', '-')}.npz"

  def permutations(self, pattern: str) -> dict[str, Permutation]:
    cache = self._permutation_cache(pattern)
    if cache.exists():
      return load_permutations(cache)
    start = time.perf_counter()
    scores = kernel_scores(self.params, self.settings.score, self.norms)
    found = search_permutations(scores, VNMConfig.parse(pattern),
                                seconds_per_kernel=self.settings.permutation_seconds)
    save_permutations(found, cache)
    seconds = time.perf_counter() - start
    cache.with_suffix(".json").write_text(json.dumps(
        {"seconds_per_kernel": self.settings.permutation_seconds, "search_seconds": seconds,
         "backend": jax.default_backend()}))
    self.log(f"permutations {pattern}: {seconds:.0f} s")
    return found

  def permutation_search(self, pattern: str) -> dict:
    """How the cached permutations of ``pattern`` were searched (budget, time, backend)."""
    info = self._permutation_cache(pattern).with_suffix(".json")
    return json.loads(info.read_text()) if info.exists() else {}

  def masks(self, config, permutations=None) -> Any:
    configs = allocation_patterns(config) if isinstance(config, dict) else None
    return vnm_jax.tree_masks(self.params, None if configs else config, configs=configs,
                              filter=PRUNABLE_PATTERN, score=self.settings.score,
                              input_norms=None if self.settings.score == "magnitude"
                              else self.norms, permutations=permutations)

  # --- parts -----------------------------------------------------------------------------

  def grid(self) -> None:
    if not self.recorded(method="dense"):
      ppl, nll, seconds = self.evaluate(self.params)
      self.record(method="dense", recipe="dense", pattern="-", density=1.0, permuted=False,
                  ppl=ppl, nll=nll, seconds=seconds)
    for pattern in self.settings.patterns:
      for permuted in (False, True):
        method = "one-shot + permutation" if permuted else "one-shot"
        if self.recorded(method=method, pattern=str(VNMConfig.parse(pattern))):
          continue
        start = time.perf_counter()
        masks = self.masks(pattern, self.permutations(pattern) if permuted else None)
        ppl, nll, _ = self.evaluate(vnm_jax.tree_apply_masks(self.params, masks))
        self.record(method=method, recipe="one-shot", pattern=str(VNMConfig.parse(pattern)),
                    permuted=permuted, density=average_density(self.shapes, pattern),
                    calibration_windows=self.settings.calibration_windows,
                    permutation_search=self.permutation_search(pattern) if permuted else None,
                    ppl=ppl, nll=nll, seconds=time.perf_counter() - start)

  def sensitivities(self) -> dict[str, dict[str, float]]:
    cache = self.work_dir / "sensitivities.json"
    if cache.exists():
      cached = json.loads(cache.read_text())
      if cached["candidates"] == list(self.settings.candidates):
        return cached["sensitivities"]
    start = time.perf_counter()
    windows = calibration_batches(self.split.train, self.settings.sensitivity_windows, WINDOW,
                                  self.settings.sensitivity_windows)[0]
    model = nnx.merge(self.graphdef, cast_floats(self.params, self.dtype))
    found = kernel_sensitivities(model, windows[:, :self.settings.sensitivity_length],
                                 self.settings.candidates, input_norms=self.norms,
                                 score=self.settings.score, progress=self.progress)
    seconds = time.perf_counter() - start
    cache.write_text(json.dumps({"candidates": list(self.settings.candidates),
                                 "tokens": int(windows[:, :self.settings.sensitivity_length].size),
                                 "seconds": seconds, "sensitivities": found}))
    self.log(f"sensitivities: {seconds:.0f} s")
    return found

  def allocation(self, density) -> dict[str, VNMConfig]:
    return allocate(self.sensitivities(), self.shapes, density)

  def cached_permutations(self, allocation: dict[str, VNMConfig]) -> dict | None:
    """Each kernel's permutation for its allocated config, when every config used has its
    permutations cached (searched for the grid); None otherwise (no search is started)."""
    configs = set(allocation.values())
    if not all(self._permutation_cache(str(c)).exists() for c in configs):
      return None
    by_config = {c: self.permutations(str(c)) for c in configs}
    return {path: by_config[c][path] for path, c in allocation.items()}

  def allocations(self) -> None:
    for density in self.settings.allocation_densities:
      label = f"per-layer @ {density}"
      allocation = None
      for permuted in (False, True):
        method = "per-layer allocation" + (" + permutation" if permuted else "")
        if self.recorded(method=method, pattern=label):
          continue
        start = time.perf_counter()
        allocation = allocation or self.allocation(density)
        (self.work_dir / f"allocation_{str(density).replace(':', '-')}.json").write_text(
            json.dumps({p: str(c) for p, c in allocation.items()}, indent=0))
        permutations = self.cached_permutations(allocation) if permuted else None
        if permuted and permutations is None:
          self.log(f"{method} {label}: skipped, a config has no cached permutations")
          continue
        masks = self.masks(allocation, permutations)
        ppl, nll, _ = self.evaluate(vnm_jax.tree_apply_masks(self.params, masks))
        counts = {str(c): sum(1 for x in allocation.values() if x == c)
                  for c in sorted(set(allocation.values()), key=lambda c: c.m)}
        self.record(method=method, recipe="per-layer allocation", pattern=label,
                    permuted=permuted, density=average_density(self.shapes, allocation),
                    candidates=list(self.settings.candidates), configs=counts, ppl=ppl,
                    nll=nll, seconds=time.perf_counter() - start)

  def lora_steps(self) -> int:
    """The LoRA run's steps: the preset's, or fewer where the deadline requires."""
    steps = self.settings.lora.steps
    if self.deadline is None:
      return steps
    compile_s, step_s = self.lora_timing or (self.settings.first_compile_seconds,
                                             self.settings.first_step_seconds)
    # The merged model's evaluation and its V:N:M check follow the run.
    left = self.deadline - time.perf_counter() - compile_s - 2 * self.evaluation_seconds - 5.0
    return max(0, min(steps, int(left / step_s)))

  def lora_runs(self) -> None:
    for pattern in self.settings.lora_patterns:
      is_allocation = pattern == ALLOCATION
      label = (f"per-layer @ {self.settings.allocation_densities[0]}" if is_allocation
               else str(VNMConfig.parse(pattern)))
      method = "per-layer allocation + LoRA" if is_allocation else "three-stage LoRA"
      if self.recorded(method=method, pattern=label):
        continue
      steps = self.lora_steps()
      if steps < min(20, self.settings.lora.steps):
        self.log(f"LoRA {label}: skipped, {steps} steps left before the deadline")
        continue
      settings = dataclasses.replace(self.settings.lora, steps=steps,
                                     mask_score=self.settings.score)
      if is_allocation:
        config = self.allocation(self.settings.allocation_densities[0])
        permutations = None
      else:
        config, permutations = pattern, self.permutations(pattern)
      result = train_three_stage_lora(self.model, self.split.train, config, settings,
                                      input_norms=self.norms, permutations=permutations,
                                      dtype=self.dtype, progress=self.progress)
      self.lora_timing = (result.compile_seconds,
                          (result.seconds - result.compile_seconds) / max(1, steps - 1))
      for path, mask in result.masks.items():
        permutation = (permutations or {}).get(path)
        if not vnm_jax.is_vnm(np.asarray(mask), result.configs[path], permutation=permutation):
          raise AssertionError(f"the merged mask of {path} is not {result.configs[path]}")
      ppl, nll, eval_seconds = self.evaluate(result.params)
      density = average_density(self.shapes, result.configs)
      self.record(method=method, recipe="three-stage LoRA", pattern=label,
                  permuted=permutations is not None, density=density, ppl=ppl, nll=nll,
                  mask_score=settings.mask_score, steps=steps,
                  steps_planned=self.settings.lora.steps, stage_steps=settings.stage_steps(),
                  batch_size=settings.batch_size, sequence_length=settings.sequence_length,
                  tokens=result.tokens, rank=settings.rank, alpha=settings.alpha,
                  learning_rate=settings.learning_rate, update_every=settings.update_every,
                  train_seconds=result.seconds, compile_seconds=result.compile_seconds,
                  eval_seconds=eval_seconds, lora_devices=result.devices,
                  first_loss=result.losses[0],
                  last_loss=float(np.mean(result.losses[-max(1, steps // 20):])))


def run_study(settings: StudySettings, model: Llama, split: TokenSplit, *, work_dir: Path,
              results: Path, parts: Sequence[str] = PARTS, dtype=None,
              deadline_s: float | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
  """Runs the study's ``parts`` ("grid", "allocation", "lora"), appending to ``results``.

  Args:
    settings: the study (a preset from `PRESETS` or your own).
    model: the dense float32 Llama.
    split: the token split (`vnm_recipes.data.text.split_pydoc_topics` or `load_split`).
    work_dir: the artifact cache (created).
    results: the JSONL results file; records already there (same method, pattern, eval
      tokens and dtype) are not measured again.
    parts: which parts to run, in the order of `PARTS`.
    dtype: evaluation and LoRA dtype; None for `training.default_dtype()`.
    deadline_s: wall-clock budget of this call; LoRA runs are shortened to fit.
    progress: progress bars.
    log: where one-line progress notes go.

  Returns:
    All records of ``results`` (old and new).
  """
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise ValueError(f"parts must be among {PARTS}, got {unknown}")
  if not WINDOW <= settings.eval_tokens <= len(split.eval):
    raise ValueError(f"settings.eval_tokens must be in [{WINDOW}, {len(split.eval)}], got "
                     f"{settings.eval_tokens}")
  if ALLOCATION in settings.lora_patterns and not settings.allocation_densities:
    raise ValueError("lora_patterns names 'allocation' but allocation_densities is empty")
  work_dir.mkdir(parents=True, exist_ok=True)
  study = _Study(settings, model, split, work_dir, results,
                 default_dtype() if dtype is None else dtype, deadline_s, progress, log)
  if "grid" in parts:
    study.grid()
  if "allocation" in parts:
    study.allocations()
  if "lora" in parts:
    study.lora_runs()
  log(f"study parts {list(parts)} done in {time.perf_counter() - study.start:.0f} s")
  return study.done

