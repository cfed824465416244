"""The ViT pruning pipeline: dense training, then every V:N:M variant pruned and fine-tuned."""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import vnm_jax
from vnm_jax import Permutation, VNMConfig
from vnm_recipes.data.digits import load_digits_split
from vnm_recipes.models.vit import ViTConfig, gemm_shapes, prunable_kernel_paths
from vnm_recipes.vit.presets import PRESETS, PipelinePreset
from vnm_recipes.vit.reports import PipelineResult, SparseModel, VariantResult, write_results
from vnm_recipes.vit.training import (accuracy, make_optimizer, run_epochs, sparse_step,
                                      train_dense)


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


def run_pipeline(preset: str | PipelinePreset, out_dir: str | os.PathLike, *,
                 progress: bool = True, log: Callable[[str], None] = print) -> PipelineResult:
  """Dense training, then V:N:M pruning and fine-tuning of every variant; writes the results.

  For each config of the preset, without and with channel permutations
  (`vnm_jax.tree_permutations` on |W| of the dense model): one-shot
  magnitude pruning (column-L1 rule) of the block kernels (`prunable_kernel_paths`),
  fixed-mask fine-tuning from it, and SR-STE fine-tuning from the dense weights (the
  mask recomputed every step, in the permuted coordinates for permuted variants). The
  matmul speedup of each (config, permutation) is measured in the same run with
  `measure_matmul_speedup` on the model's GEMM shapes.

  Args:
    preset: a name in `PRESETS` ("short", "full") or a `PipelinePreset`.
    out_dir: where results.md, results.json and accuracy_vs_speedup.png are written
      (created if missing).
    progress: show tqdm bars (training epochs, permutation search).
    log: receives one line per finished stage.

  Returns:
    A `PipelineResult`.
  """
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"preset must be one of {sorted(PRESETS)} or a PipelinePreset, "
                       f"got {preset!r}")
    preset = PRESETS[preset]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = load_digits_split()
  if preset.train_images is not None:
    data = data._replace(train_images=data.train_images[:preset.train_images],
                         train_labels=data.train_labels[:preset.train_images])
  graphdef, dense_params, dense_run = train_dense(preset.model, preset.dense, data,
                                                  progress=progress)
  evaluate = lambda params: accuracy(graphdef, params, data.test_images, data.test_labels)
  dense_accuracy = evaluate(dense_params)
  log(f"dense: test acc {100 * dense_accuracy:.2f} % ({dense_run.seconds:.0f} s)")

  names = _kernel_names(preset.model)
  selected = lambda path, leaf: path in names
  steps = (len(data.train_images) // preset.finetune.batch_size) * preset.finetune.epochs
  inner = make_optimizer(preset.finetune, steps)
  # fixed_mask's update reads the masks from its state, not from the closure: one
  # compiled step serves every config and permutation (the masks are step arguments).
  fixed_step = None
  variants, timings, models = [], {}, {}
  for config_text in preset.configs:
    config = VNMConfig.parse(config_text)
    configs_tree = vnm_jax.tree_configs(dense_params, config, filter=selected)
    sr_ste_tx = vnm_jax.sr_ste(inner, configs_tree)
    sr_ste_step = sparse_step(graphdef, sr_ste_tx, preset.finetune)
    for permuted in (False, True):
      started = time.perf_counter()
      permutations = {}
      if permuted:
        permutations, table = vnm_jax.tree_permutations(
            dense_params, config, filter=selected, time_budget_s=preset.permutation_seconds,
            progress=progress)
        log(f"{config} permutations: mean share of the gap to unstructured pruning closed "
            f"{table.mean_gap_closed:.3f}")
      indices = permutation_indices(dense_params, names, permutations)
      stored = vnm_jax.tree_permute(dense_params, indices)
      stored_masks = vnm_jax.tree_masks(stored, config, filter=selected)
      unpermuted = lambda tree: vnm_jax.tree_unpermute(tree, indices)
      one_shot = SparseModel(unpermuted(vnm_jax.tree_apply_masks(stored, stored_masks)),
                             unpermuted(stored_masks), permutations)
      speedup, timings[f"{config}|{permuted}"] = _gemm_speedup(
          preset.model, one_shot.params, one_shot.masks, config, permutations,
          preset.speed_batch, preset.speed_repeats)
      label = f"{config} {'permuted' if permuted else 'identity'}"
      outcomes = {"one-shot": one_shot}
      seconds = {"one-shot": time.perf_counter() - started}
      fixed_tx = vnm_jax.fixed_mask(inner, stored_masks)
      if fixed_step is None:
        fixed_step = sparse_step(graphdef, fixed_tx, preset.finetune)
      for method, tx, step in (("fixed-mask", fixed_tx, fixed_step),
                               ("sr-ste", sr_ste_tx, sr_ste_step)):
        method_started = time.perf_counter()
        opt_state = tx.init(stored)
        (tuned, opt_state, _), _ = run_epochs(step, (stored, opt_state, indices), data,
                                              preset.finetune, f"{label} {method}", progress)
        outcomes[method] = SparseModel(unpermuted(vnm_jax.sparse_params(tuned, opt_state)),
                                       unpermuted(vnm_jax.sparse_masks(opt_state)), permutations)
        seconds[method] = time.perf_counter() - method_started
      for method, model in outcomes.items():
        models[(str(config), permuted, method)] = model
        variants.append(VariantResult(str(config), permuted, method, evaluate(model.params),
                                      speedup, seconds[method]))
      log(f"{label}: " + ", ".join(f"{row.method} {100 * row.test_accuracy:.2f} %"
                                   for row in variants[-3:])
          + f"; GEMM speedup {speedup:.2f}x ({time.perf_counter() - started:.0f} s)")

  result = PipelineResult(
      preset=preset.name, device=jax.devices()[0].device_kind, dense_accuracy=dense_accuracy,
      dense_params=dense_params, dense_seconds=dense_run.seconds, variants=variants,
      timings=timings, models=models, graphdef=graphdef, table_path=out_dir / "results.md",
      json_path=out_dir / "results.json",
      plot_path=out_dir / "accuracy_vs_speedup.png")
  write_results(result)
  return result
