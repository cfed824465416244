"""The ViT pruning pipeline: per seed, dense training, the same-budget dense baseline, then
every V:N:M variant pruned and fine-tuned; each finished seed is saved, so a run can resume."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import vnm_jax
from vnm_jax import Permutation, VNMConfig
from vnm_recipes.data.images import ImageSplit, load_image_dataset
from vnm_recipes.models.vit import ViTConfig, gemm_shapes, prunable_kernel_paths
from vnm_recipes.vit.presets import PRESETS, PipelinePreset
from vnm_recipes.vit.reports import (PipelineResult, SeedResult, SparseModel, VariantResult,
                                     write_results)
from vnm_recipes.vit.training import (accuracy, make_optimizer, run_epochs, sparse_step,
                                      train_dense, train_same_budget)


def _kernel_names(model_config: ViTConfig) -> list[str]:
  """The prunable kernels' path strings, as `vnm_jax.trees` names them."""
  return ["/".join(map(str, path)) for path in prunable_kernel_paths(model_config)]


def permutation_indices(params: Any, kernel_names: Sequence[str],
                        permutations: dict[str, Permutation]) -> dict[str, Permutation]:
  """kernel path -> `Permutation` of int32 index arrays, the identity where not permuted.

  Full index arrays (never None) give permuted and unpermuted variants the same pytree
  structure, so one compiled training step serves both (`vnm_jax.tree_permute` and
  `vnm_jax.tree_unpermute` apply them).
  """
  leaves = vnm_jax.leaves_by_path(params)
  indices = {}
  for name in kernel_names:
    k, n = leaves[name].shape
    permutation = permutations.get(name) or Permutation(None, None)
    inputs = np.arange(k) if permutation.inputs is None else permutation.inputs
    outputs = np.arange(n) if permutation.outputs is None else permutation.outputs
    indices[name] = Permutation(jnp.asarray(inputs, jnp.int32), jnp.asarray(outputs, jnp.int32))
  return indices


def _gemm_speedup(model_config: ViTConfig, params: Any, masks: Any, config: VNMConfig,
                  permutations: dict[str, Permutation], batch: int,
                  repeats: int) -> tuple[float, list[dict]]:
  """Dense / V:N:M time summed over block 0's four pruned GEMMs, compressed as pruned.

  Every block has the same four GEMM shapes, so this is the speedup of all pruned GEMMs.
  """
  params_by_path = vnm_jax.leaves_by_path(params)
  masks_by_path = vnm_jax.leaves_by_path(masks)
  shapes = gemm_shapes(model_config, batch)
  timings = []
  for path in prunable_kernel_paths(model_config)[:4]:
    name = "/".join(map(str, path))
    tokens, k, n = shapes[path[3]]
    weight = vnm_jax.compress(params_by_path[name], config, mask=masks_by_path[name],
                              permutation=permutations.get(name))
    timings.append(vnm_jax.measure_matmul_speedup(k, n, tokens, config, weight=weight,
                                                  repeats=repeats).as_dict())
  speedup = sum(t["dense_seconds"] for t in timings) / sum(t["vnm_seconds"] for t in timings)
  return speedup, timings


def resolve_preset(preset: str | PipelinePreset) -> PipelinePreset:
  """The preset named (a key of `PRESETS`) or given."""
  if isinstance(preset, PipelinePreset):
    return preset
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)} or a PipelinePreset, "
                     f"got {preset!r}")
  return PRESETS[preset]


def run_seed(preset: PipelinePreset, data: ImageSplit, seed: int, *, progress: bool = True,
             log: Callable[[str], None] = print) -> tuple[SeedResult, Any]:
  """One seed of the pipeline: dense training, the same-budget dense model, every variant.

  For each config of the preset, without and with channel permutations
  (`vnm_jax.tree_permutations` on |W| of the dense model): one-shot magnitude pruning
  (column-L1 rule) of the block kernels (`prunable_kernel_paths`), fixed-mask fine-tuning
  from it, and SR-STE fine-tuning from the dense weights (the mask recomputed every
  step, in the permuted coordinates for permuted variants). The same-budget dense model
  is trained from the dense weights with the fine-tunings' config (`train_same_budget`).
  The matmul speedup of each (config, permutation) is measured with
  `measure_matmul_speedup` on the model's GEMM shapes.

  Args:
    preset: the sizes; its dense and finetune seeds are replaced by ``seed``.
    data: the image split (already cut to preset.train_images).
    seed: the seed of initialisation, batch order, augmentation and dropout.
    progress: show tqdm bars.
    log: receives one line per finished stage.

  Returns:
    (the `SeedResult` with its params and models, the model's graphdef).
  """
  dense_config = dataclasses.replace(preset.dense, seed=seed)
  finetune = dataclasses.replace(preset.finetune, seed=seed)
  graphdef, dense_params, dense_run = train_dense(preset.model, dense_config, data,
                                                  progress=progress)
  evaluate = lambda params: accuracy(graphdef, params, data.test_images, data.test_labels)
  dense_accuracy = evaluate(dense_params)
  log(f"seed {seed} dense: test acc {100 * dense_accuracy:.2f} % ({dense_run.seconds:.0f} s)")
  same_budget = train_same_budget(graphdef, dense_params, data, finetune, progress=progress)
  same_budget_accuracy = evaluate(same_budget.params)
  log(f"seed {seed} dense, same budget (+{finetune.epochs} epochs): test acc "
      f"{100 * same_budget_accuracy:.2f} % ({same_budget.seconds:.0f} s)")

  names = _kernel_names(preset.model)
  selected = lambda path, leaf: path in names
  steps = (len(data.train_images) // finetune.batch_size) * finetune.epochs
  inner = make_optimizer(finetune, steps)
  # fixed_mask's update reads the masks from its state, not from the closure: one
  # compiled step serves every config and permutation (the masks are step arguments).
  fixed_step = None
  variants, timings, models = [], {}, {}
  for config_text in preset.configs:
    config = VNMConfig.parse(config_text)
    configs_tree = vnm_jax.tree_configs(dense_params, config, filter=selected)
    sr_ste_tx = vnm_jax.sr_ste(inner, configs_tree)
    sr_ste_step = sparse_step(graphdef, sr_ste_tx, finetune)
    for permuted in (False, True):
      started = time.perf_counter()
      permutations = {}
      if permuted:
        permutations, table = vnm_jax.tree_permutations(
            dense_params, config, filter=selected, time_budget_s=preset.permutation_seconds,
            progress=progress, seed=seed)
        log(f"seed {seed} {config} permutations: mean share of the gap to unstructured "
            f"pruning closed {table.mean_gap_closed:.3f}")
      indices = permutation_indices(dense_params, names, permutations)
      stored = vnm_jax.tree_permute(dense_params, indices)
      stored_masks = vnm_jax.tree_masks(stored, config, filter=selected)
      unpermuted = lambda tree: vnm_jax.tree_unpermute(tree, indices)
      one_shot = SparseModel(unpermuted(vnm_jax.tree_apply_masks(stored, stored_masks)),
                             unpermuted(stored_masks), permutations)
      speedup, timings[f"{config}|{permuted}"] = _gemm_speedup(
          preset.model, one_shot.params, one_shot.masks, config, permutations,
          preset.speed_batch, preset.speed_repeats)
      label = f"seed {seed} {config} {'permuted' if permuted else 'identity'}"
      outcomes = {"one-shot": one_shot}
      seconds, step_counts = {"one-shot": time.perf_counter() - started}, {"one-shot": 0}
      fixed_tx = vnm_jax.fixed_mask(inner, stored_masks)
      if fixed_step is None:
        fixed_step = sparse_step(graphdef, fixed_tx, finetune)
      for method, tx, step in (("fixed-mask", fixed_tx, fixed_step),
                               ("sr-ste", sr_ste_tx, sr_ste_step)):
        method_started = time.perf_counter()
        opt_state = tx.init(stored)
        (tuned, opt_state, _), _, step_counts[method] = run_epochs(
            step, (stored, opt_state, indices), data, finetune, f"{label} {method}", progress)
        outcomes[method] = SparseModel(unpermuted(vnm_jax.sparse_params(tuned, opt_state)),
                                       unpermuted(vnm_jax.sparse_masks(opt_state)), permutations)
        seconds[method] = time.perf_counter() - method_started
      for method, model in outcomes.items():
        models[(str(config), permuted, method)] = model
        variants.append(VariantResult(str(config), permuted, method, evaluate(model.params),
                                      speedup, seconds[method], step_counts[method]))
      log(f"{label}: " + ", ".join(f"{row.method} {100 * row.test_accuracy:.2f} %"
                                   for row in variants[-3:])
          + f"; GEMM speedup {speedup:.2f}x ({time.perf_counter() - started:.0f} s)")

  result = SeedResult(seed=seed, dense_accuracy=dense_accuracy,
                      same_budget_accuracy=same_budget_accuracy,
                      dense_seconds=dense_run.seconds, same_budget_seconds=same_budget.seconds,
                      same_budget_steps=same_budget.steps, variants=variants, timings=timings,
                      dense_params=dense_params, same_budget_params=same_budget.params,
                      models=models)
  return result, graphdef


def seed_path(out_dir: str | os.PathLike, seed: int) -> pathlib.Path:
  """Where `run_pipeline` saves (and looks for) one seed's results."""
  return pathlib.Path(out_dir) / f"seed_{seed}.json"


def load_saved_seeds(out_dir: str | os.PathLike, preset: PipelinePreset
                     ) -> dict[int, SeedResult]:
  """seed -> `SeedResult` of every seed saved in out_dir by a preset with preset's settings
  (`PipelinePreset.settings`); files of other settings are ignored."""
  saved = {}
  for path in sorted(pathlib.Path(out_dir).glob("seed_*.json")):
    record = json.loads(path.read_text())
    if record.get("settings") == preset.settings():
      result = SeedResult.from_dict(record["result"])
      saved[result.seed] = result
  return saved


def run_pipeline(preset: str | PipelinePreset, out_dir: str | os.PathLike, *,
                 seeds: Sequence[int] | None = None, resume: bool = False,
                 data_dir: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> PipelineResult:
  """Runs `run_seed` for each seed, saving each as it finishes, then writes the summary.

  Each finished seed is saved at once (`seed_path`), so a long run can be done in chunks
  (``seeds=[0]``, then ``[1]``, ...); with ``resume=True`` a seed already saved by a
  preset with the same settings is loaded instead of run again (an interrupted run
  continues where it stopped). The table covers the seeds run and every other seed saved
  in out_dir with these settings (the log names the ones loaded).

  Args:
    preset: a name in `PRESETS` ("short", "digits", "full") or a `PipelinePreset`.
    out_dir: where seed_<n>.json, results.md, results.json and accuracy_vs_speedup.png
      are written (created if missing).
    seeds: the seeds to run (default: the preset's).
    resume: skip the seeds already saved in out_dir with these settings.
    data_dir: where Fashion-MNIST's idx files are looked for first (see
      `vnm_recipes.data.fashion_mnist`); the digits need none.
    progress: show tqdm bars (training steps, permutation search).
    log: receives one line per finished stage.

  Returns:
    A `PipelineResult` over the saved seeds (with params and models for those run now).
  """
  preset = resolve_preset(preset)
  seeds = preset.seeds if seeds is None else tuple(seeds)
  if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
    raise ValueError(f"seeds must be ints >= 0, at least one, got {seeds!r}")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  saved = load_saved_seeds(out_dir, preset)
  to_run = [s for s in dict.fromkeys(seeds) if not (resume and s in saved)]
  for seed in sorted(set(saved) - set(to_run)):
    log(f"seed {seed}: loaded from {seed_path(out_dir, seed)} (saved by an earlier run)")
  graphdef = None
  if to_run:
    data = _load_data(preset, data_dir)
    for seed in to_run:
      started = time.perf_counter()
      saved[seed], graphdef = run_seed(preset, data, seed, progress=progress, log=log)
      record = {"settings": preset.settings(), "device": jax.devices()[0].device_kind,
                "result": saved[seed].as_dict()}
      path = seed_path(out_dir, seed)
      path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
      path.with_suffix(".tmp").replace(path)  # never a half-written seed file
      log(f"seed {seed}: done in {time.perf_counter() - started:.0f} s, saved to {path}")

  result = PipelineResult(
      preset=preset.name, dataset=preset.dataset, device=jax.devices()[0].device_kind,
      finetune_epochs=preset.finetune.epochs, dense_epochs=preset.dense.epochs,
      seeds=[saved[s] for s in sorted(saved)], graphdef=graphdef,
      table_path=out_dir / "results.md", json_path=out_dir / "results.json",
      plot_path=out_dir / "accuracy_vs_speedup.png")
  write_results(result)
  return result


def _load_data(preset: PipelinePreset, data_dir: str | os.PathLike | None) -> ImageSplit:
  """The preset's data set, cut to preset.train_images, checked against the model's input."""
  data = load_image_dataset(preset.dataset, data_dir)
  expected = (preset.model.image_size, preset.model.image_size, preset.model.channels)
  if tuple(data.train_images.shape[1:]) != expected:
    raise ValueError(f"PipelinePreset.model takes {expected} images, but {preset.dataset!r} "
                     f"has {tuple(data.train_images.shape[1:])}")
  if preset.train_images is not None:
    data = data._replace(train_images=data.train_images[:preset.train_images],
                         train_labels=data.train_labels[:preset.train_images])
  return data
