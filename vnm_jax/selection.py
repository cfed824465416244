"""Choosing V and M: the most accurate V:N:M pattern whose measured speedup meets a target.

Two-phase sift (spec section 2): drop every (V, M) whose speedup, measured on the
target device for the model's real GEMM shapes, is below the target; among the
rest take the one with the largest mask diversity. Mask diversity is the number of
masks a pattern admits per weight element: a V x M block admits C(M,4) * 6^V masks,
so K(V,M) = (C(M,4) * 6^V)^(1/(V*M)). Larger K means a less constrained pattern,
our proxy for accuracy after pruning. M dominates; at a fixed M smaller V wins.

Measuring: :func:`model_gemm_shapes` lists the (in, out) shapes of a model's
prunable kernels; :func:`measure_speedups` times every shape with
:func:`vnm_jax.benchmarking.measure_matmul_speedup` for every candidate and gives
the model-level speedup (total dense time / total V:N:M time, each shape weighted by
how often it occurs). GEMM shapes are data ({(in, out): count}); the GEMM shapes of
named models and the ``vnm-jax select`` command are in the recipes
(``vnm_recipes.speed``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import check_kernel_shape
from vnm_jax.trees import path_predicate, path_str


def _check_vm(v, m, where: str = "") -> tuple[int, int]:
  for name, value in (("v", v), ("m", m)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{where}{name} must be an int, got {value!r}.")
  if v < 1:
    raise ValueError(f"{where}v must be >= 1, got {v}.")
  if m < KEPT_COLUMNS:
    raise ValueError(f"{where}m must be >= {KEPT_COLUMNS} (4 columns are kept per block), "
                     f"got {m}.")
  return int(v), int(m)


def mask_diversity(v: int, m: int) -> float:
  """Natural log of the mask diversity K(V, M) = (C(M,4) * 6^V)^(1/(V*M)).

  ln K = (ln C(M,4) + V ln 6) / (V M); e.g. 0.3634 for 64:2:5 and 0.2323 for 64:2:8.
  """
  v, m = _check_vm(v, m)
  return (math.log(math.comb(m, KEPT_COLUMNS)) + v * math.log(6.0)) / (v * m)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One (V, M) pattern in the selection table.

  Attributes:
    v, m: the pattern V:2:M.
    speedup: the measured model-level speedup over dense.
    log_diversity: :func:`mask_diversity` (natural log of K(V, M)).
    meets_target: speedup >= the target.
  """

  v: int
  m: int
  speedup: float
  log_diversity: float
  meets_target: bool

  @property
  def config(self) -> VNMConfig:
    return VNMConfig(self.v, 2, self.m)


def _check_speedups(speedups: Mapping) -> dict[tuple[int, int], float]:
  if not isinstance(speedups, Mapping):
    raise TypeError(f"speedups must be a mapping {{(v, m): speedup}}, got "
                    f"{type(speedups).__name__}.")
  if not speedups:
    raise ValueError("speedups is empty: measure at least one (v, m) candidate.")
  checked = {}
  for key, speedup in speedups.items():
    if not (isinstance(key, tuple) and len(key) == 2):
      raise TypeError(f"speedups keys must be (v, m) tuples, got {key!r}.")
    v, m = _check_vm(*key, where=f"speedups key {key!r}: ")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float, np.floating)):
      raise TypeError(f"speedups[{key!r}] must be a number, got {speedup!r}.")
    if not (math.isfinite(speedup) and speedup > 0):
      raise ValueError(f"speedups[{key!r}] must be a finite positive number, got {speedup!r}.")
    checked[(v, m)] = float(speedup)
  return checked


def _check_target(target) -> float:
  if isinstance(target, bool) or not isinstance(target, (int, float, np.floating)):
    raise TypeError(f"target must be a number (a speedup such as 1.5), got {target!r}.")
  if not (math.isfinite(target) and target > 0):
    raise ValueError(f"target must be a finite positive speedup, got {target!r}.")
  return float(target)


def rank_candidates(speedups: Mapping[tuple[int, int], float], target: float) -> list[Candidate]:
  """All candidates, most diverse first (ties: higher speedup, then smaller V).

  Args:
    speedups: {(v, m): measured speedup}.
    target: the speedup a candidate must reach.
  """
  checked = _check_speedups(speedups)
  target = _check_target(target)
  rows = [Candidate(v, m, s, mask_diversity(v, m), s >= target)
          for (v, m), s in checked.items()]
  return sorted(rows, key=lambda c: (-c.log_diversity, -c.speedup, c.v, c.m))


def select_vm(speedups: Mapping[tuple[int, int], float], target: float) -> tuple[int, int]:
  """The (v, m) with the largest mask diversity among those whose speedup >= target.

  Args:
    speedups: {(v, m): speedup measured on the target device for the model's GEMMs}.
    target: the required speedup s (e.g. 1.5).

  Returns:
    (v, m) of the chosen pattern.

  Raises:
    ValueError: when no candidate reaches the target (the message names the fastest).
  """
  ranked = rank_candidates(speedups, target)
  for candidate in ranked:
    if candidate.meets_target:
      return candidate.v, candidate.m
  fastest = max(ranked, key=lambda c: c.speedup)
  raise ValueError(f"no candidate reaches the target speedup {target:g}: the fastest is "
                   f"{fastest.v}:2:{fastest.m} at {fastest.speedup:.3f}x. Lower the target "
                   f"or add candidates with a larger M.")


def format_candidates(candidates: Sequence[Candidate], target: float,
                      choice: tuple[int, int] | None = None) -> str:
  """A text table of the candidates (as from :func:`rank_candidates`), the choice marked."""
  lines = [f"target speedup {target:g}",
           f"{'V:N:M':>9}  {'speedup':>8}  {'ln K':>7}  {'meets':>5}  choice",
           f"{'-' * 9}  {'-' * 8}  {'-' * 7}  {'-' * 5}  {'-' * 6}"]
  for c in candidates:
    mark = "<==" if choice == (c.v, c.m) else ""
    lines.append(f"{f'{c.v}:2:{c.m}':>9}  {c.speedup:>7.3f}x  {c.log_diversity:>7.4f}  "
                 f"{'yes' if c.meets_target else 'no':>5}  {mark}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The measuring side


def model_gemm_shapes(params, *, filter=None) -> dict[tuple[int, int], int]:
  """{(in_features, out_features): count} over a model's selected kernels.

  Args:
    params: a Flax linen param dict or an ``nnx.State`` (arrays or ShapeDtypeStructs).
    filter: which leaves are pruned, as in :func:`vnm_jax.trees.tree_configs` (a path
      regex, a predicate (path, leaf) -> bool, or None for 2D ``kernel`` leaves
      outside embeddings, norms and heads).
  """
  selected = path_predicate(filter)
  shapes: dict[tuple[int, int], int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    if not selected(name, leaf):
      continue
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) != 2:
      raise ValueError(f"selected leaf {name!r} has shape {shape}; V/M selection times 2D "
                       f"(in, out) kernels only (narrow the filter).")
    check_kernel_shape(shape, f"selected leaf {name!r}")
    shapes[shape] = shapes.get(shape, 0) + 1
  if not shapes:
    raise ValueError("no kernel of params is selected by the filter: nothing to time.")
  return shapes


def _parse_shapes(gemm_shapes) -> dict[tuple[int, int], int]:
  if isinstance(gemm_shapes, Mapping):
    items = list(gemm_shapes.items())
  else:
    items = [(shape, 1) for shape in gemm_shapes]
  if not items:
    raise ValueError("gemm_shapes is empty: give at least one (in_features, out_features).")
  parsed: dict[tuple[int, int], int] = {}
  for shape, count in items:
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                    for d in shape)):
      raise ValueError(f"gemm_shapes entries must be (in_features, out_features) tuples of "
                       f"positive ints, got {shape!r}.")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(f"the count of GEMM shape {shape!r} must be a positive int, got "
                       f"{count!r}.")
    key = (int(shape[0]), int(shape[1]))
    parsed[key] = parsed.get(key, 0) + int(count)
  return parsed


def measure_speedups(gemm_shapes, candidates: Sequence[VNMConfig | str | tuple[int, int]],
                     tokens: int, *, dtype=jnp.float32, implementation: str | None = None,
                     repeats: int = 10, progress: bool = True,
                     measure: Callable | None = None) -> dict[tuple[int, int], float]:
  """Model-level speedup of every candidate on the current device.

  Every (shape, candidate) pair is timed with
  :func:`vnm_jax.benchmarking.measure_matmul_speedup` (dense and V:N:M in the same
  run). The model-level speedup of a candidate is sum(count * dense time) /
  sum(count * V:N:M time) over the shapes.

  Args:
    gemm_shapes: {(in, out): count} (e.g. from :func:`model_gemm_shapes`) or a
      sequence of (in, out) tuples.
    candidates: configs (VNMConfig, "V:N:M" strings or (v, m) tuples).
    tokens: rows of the activations (batch * sequence length at inference).
    dtype, implementation, repeats: passed to ``measure_matmul_speedup``.
    progress: show a tqdm bar over the (shape, candidate) pairs.
    measure: the timing function (default ``measure_matmul_speedup``); it takes
      (in_features, out_features, tokens, config, dtype=, implementation=, repeats=)
      and returns an object with ``dense_seconds`` and ``vnm_seconds``.

  Returns:
    {(v, m): speedup}, ready for :func:`select_vm`.
  """
  shapes = _parse_shapes(gemm_shapes)
  configs = []
  for candidate in candidates:
    if isinstance(candidate, tuple):
      v, m = _check_vm(*candidate, where=f"candidate {candidate!r}: ")
      candidate = VNMConfig(v, 2, m)
    configs.append(VNMConfig.parse(candidate))
  if not configs:
    raise ValueError("candidates is empty: give at least one V:N:M config.")
  if measure is None:
    from vnm_jax.benchmarking import measure_matmul_speedup as measure
  pairs = [(shape, config) for config in configs for shape in shapes]
  totals = {(c.v, c.m): [0.0, 0.0] for c in configs}
  for (k, n), config in tqdm(pairs, desc="timing GEMMs", disable=not progress):
    timing = measure(k, n, tokens, config, dtype=dtype, implementation=implementation,
                     repeats=repeats)
    totals[(config.v, config.m)][0] += shapes[(k, n)] * timing.dense_seconds
    totals[(config.v, config.m)][1] += shapes[(k, n)] * timing.vnm_seconds
  return {key: dense / vnm for key, (dense, vnm) in totals.items()}
