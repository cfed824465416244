"""One-shot pruning of a Llama: importance scores, channel permutations and V:N:M masks."""

from __future__ import annotations

from typing import Any

import jax
from tqdm.auto import tqdm

import vnm_jax
from vnm_jax import Permutation, VNMConfig
from vnm_recipes.models.llama import PRUNABLE_PATTERN


def kernel_scores(params, score: str, input_norms: dict | None) -> dict[str, jax.Array]:
  """{path: (in, out) importance scores} of every prunable kernel of an nnx state."""
  return vnm_jax.kernel_scores(params, score, filter=PRUNABLE_PATTERN, input_norms=input_norms)


def search_permutations(scores: dict[str, jax.Array], config: VNMConfig, *,
                        seconds_per_kernel: float | None = None) -> dict[str, Permutation]:
  """{path: Permutation} per kernel from `vnm_jax.find_permutation`.

  Args:
    scores: {path: (in, out) importance scores} (from `kernel_scores`); the search
      maximises the score the V:N:M mask keeps.
    config: the V:N:M pattern.
    seconds_per_kernel: time budget of each search (None: until it converges).
  """
  return {path: vnm_jax.find_permutation(s, config, scores=s, time_budget_s=seconds_per_kernel)
          for path, s in tqdm(scores.items(), desc=f"permutations {config}", leave=False)}


def one_shot_masks(params, config: VNMConfig, score: str, input_norms: dict | None, *,
                   permuted: bool, seconds_per_kernel: float | None = None
                   ) -> tuple[Any, dict[str, Permutation] | None]:
  """V:N:M masks of the prunable kernels from one score, optionally after permutation.

  Returns:
    (masks, permutations): masks in the params' structure (None where dense), and the
    {path: Permutation} the masks were formed on (None without permutation).
    seconds_per_kernel bounds each permutation search (None: until it converges).
  """
  scores = kernel_scores(params, score, input_norms)
  permutations = (search_permutations(scores, config, seconds_per_kernel=seconds_per_kernel)
                  if permuted else None)
  masks = vnm_jax.tree_masks(params, config, filter=PRUNABLE_PATTERN, scores=scores,
                             permutations=permutations)
  return masks, permutations
