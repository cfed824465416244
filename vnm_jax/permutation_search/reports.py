"""Permutations of a whole model and the report of what they bought.

:func:`tree_permutations` runs :func:`~vnm_jax.permutation_search.find_permutation` on
every kernel a tree selects and returns the permutations by path with a
:class:`PermutationTable` (one :class:`LayerPermutationReport` per kernel; ``str()`` is
a text table).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from vnm_jax._tree_util import canonical_path, compile_patterns, contraction_axes
from vnm_jax.config import VNMConfig
from vnm_jax.permutation import Permutation
from vnm_jax.permutation_search.objective import (kept_score, scores_matrix,
                                                  unstructured_kept_score)
from vnm_jax.permutation_search.search import Method, find_permutation
from vnm_jax.trees import leaves_by_path, path_str, tree_configs


@dataclasses.dataclass(frozen=True)
class LayerPermutationReport:
  """What the permutation of one kernel bought.

  Attributes:
    path: the leaf's path string (as in :mod:`vnm_jax.trees`).
    shape: the (in, out) shape of the kernel's 2D view.
    config: the V:N:M config, as "V:N:M".
    total: the kernel's total score.
    kept_identity: score kept by V:N:M pruning without permutation.
    kept_permuted: score kept with the permutation found.
    kept_unstructured: score kept by unstructured pruning at the same density.
    seconds: time spent searching.
  """

  path: str
  shape: tuple[int, int]
  config: str
  total: float
  kept_identity: float
  kept_permuted: float
  kept_unstructured: float
  seconds: float

  @property
  def gap_closed(self) -> float:
    """Share of the gap between no permutation and unstructured pruning closed (nan if none)."""
    gap = self.kept_unstructured - self.kept_identity
    return (self.kept_permuted - self.kept_identity) / gap if gap > 0 else math.nan


@dataclasses.dataclass(frozen=True)
class PermutationTable:
  """Per-layer reports of :func:`tree_permutations`; ``str()`` is a text table."""

  layers: tuple[LayerPermutationReport, ...]

  @property
  def mean_gap_closed(self) -> float:
    values = [layer.gap_closed for layer in self.layers if not math.isnan(layer.gap_closed)]
    return float(np.mean(values)) if values else math.nan

  def __str__(self) -> str:
    width = max([len("layer")] + [len(layer.path) for layer in self.layers])
    header = (f"{'layer':<{width}}  {'shape':>11}  {'config':>8}  {'kept before':>11}  "
              f"{'kept after':>10}  {'unstructured':>12}  {'gap closed':>10}  {'time':>7}")
    lines = [header, "-" * len(header)]
    for layer in self.layers:
      total = layer.total if layer.total > 0 else 1.0
      lines.append(
          f"{layer.path:<{width}}  {f'{layer.shape[0]}x{layer.shape[1]}':>11}  "
          f"{layer.config:>8}  {layer.kept_identity / total:>11.4f}  "
          f"{layer.kept_permuted / total:>10.4f}  {layer.kept_unstructured / total:>12.4f}  "
          f"{layer.gap_closed:>10.3f}  {layer.seconds:>6.1f}s")
    lines.append(f"mean gap closed: {self.mean_gap_closed:.3f} over {len(self.layers)} layers "
                 f"(kept scores as shares of each layer's total score)")
    return "\n".join(lines)


def tree_permutations(params, config: VNMConfig | str | None, *, filter=None, configs=None,
                      scores=None, in_axes=None, rule: str = "column_l1",
                      time_budget_s: float | None = None, seed: int = 0,
                      method: Method = "cocluster", search_outputs: bool = True,
                      tolerance: float = 5e-4,
                      progress: bool = True) -> tuple[dict[str, Permutation], PermutationTable]:
  """:func:`find_permutation` for every selected kernel of a model.

  Args:
    params: a linen param dict or an ``nnx.State``.
    config, filter, configs: which leaves get which VNMConfig, as in
      :func:`vnm_jax.trees.tree_configs`.
    scores: importance scores by path (a tree of ``params``' structure or a flat
      dict keyed by path string); |kernel| where not given.
    in_axes: ``{regex: contraction axes}`` for selected kernels with more than 2 dims.
    rule, time_budget_s (per kernel), seed, method, search_outputs, tolerance: as in
      :func:`find_permutation`.
    progress: show a tqdm bar over the kernels.

  Returns:
    ``(permutations, table)``: ``permutations`` maps each pruned leaf's path string to
    its :class:`~vnm_jax.permutation.Permutation` (pass it as ``permutations=`` to
    :func:`vnm_jax.trees.tree_masks`); ``table`` holds the per-layer kept scores before
    and after, the share of the gap to unstructured pruning closed, and the time.
  """
  config_tree = tree_configs(params, config, filter=filter, configs=configs)
  config_leaves = jax.tree_util.tree_leaves(
      config_tree, is_leaf=lambda x: x is None or isinstance(x, VNMConfig))
  param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  selected = [(path_str(path), leaf, cfg)
              for (path, leaf), cfg in zip(param_leaves, config_leaves) if cfg is not None]
  given_scores = leaves_by_path(scores)
  axes_patterns = compile_patterns(in_axes, "in_axes", lambda value, _: value)
  permutations, reports = {}, []
  bar = tqdm(selected, desc="permutations", disable=not progress)
  for path, leaf, cfg in bar:
    bar.set_postfix_str(path)
    axes = contraction_axes(path, leaf.shape, axes_patterns)
    leaf_scores = given_scores.get(canonical_path(path))
    matrix = scores_matrix(leaf, leaf_scores, axes)
    started = time.monotonic()
    permutation = find_permutation(matrix, cfg, scores=matrix, rule=rule,
                                   time_budget_s=time_budget_s, seed=seed, method=method,
                                   search_outputs=search_outputs, tolerance=tolerance)
    seconds = time.monotonic() - started
    permutations[path] = permutation
    reports.append(LayerPermutationReport(
        path=path, shape=matrix.shape, config=str(cfg), total=float(matrix.sum(dtype=np.float64)),
        kept_identity=kept_score(matrix, cfg, rule=rule),
        kept_permuted=kept_score(matrix, cfg, rule=rule, permutation=permutation),
        kept_unstructured=unstructured_kept_score(matrix, cfg.density), seconds=seconds))
  return permutations, PermutationTable(tuple(reports))

