"""Per-layer V:N:M allocation: one config per kernel under a global budget.

Uniform sparsity prunes every kernel alike although kernels differ in how much the
model's loss suffers from pruning them. :func:`allocate_configs` picks, for each kernel,
one of several candidate configs (e.g. 64:2:4, 64:2:5, 64:2:6, 64:2:8) so that the
summed sensitivity is as small as possible while the model stays within a budget:

- ``density=``: the kept entries over all allocated kernels are at most that share of
  their entries (a number, or a config such as "64:2:5" meaning "as many as that config
  keeps when applied to every kernel");
- ``costs=`` with ``budget=``: any additive per-kernel cost, e.g. the estimated matmul
  time of each (shape, config) from measured speedups, summed at most ``budget``.

Sensitivities are measured by the caller: the loss increase on a calibration batch when
that kernel alone is pruned with that config (what the LLM recipe does), an outlier
ratio as in OWL turned into a penalty, or any other additive score (lower is better).

The choice is a multiple-choice knapsack. It is solved greedily on each kernel's lower
convex hull of (cost, sensitivity): every kernel starts at its cheapest candidate, and the
upgrades with the largest sensitivity decrease per unit of cost are taken while they fit.
This is the optimum of the problem's linear relaxation except for the one kernel the
budget splits (whose upgrade is then skipped), so near-optimal when there are many kernels.

The result is a ``{path: VNMConfig}`` dict; :func:`allocation_patterns` turns it into the
``{regex: config}`` mapping that :func:`vnm_jax.tree_configs` (``configs=``),
:func:`vnm_jax.tree_masks` and :func:`vnm_jax.convert_to_vnm` take.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from vnm_jax.config import VNMConfig


def kept_entries(shape: tuple[int, int], config: VNMConfig | str) -> int:
  """Entries a V:N:M mask keeps in a (K, N) kernel with non-zero scores.

  Every full group of M inputs keeps 2 entries per output; a last group of r < M real
  inputs (padded) keeps min(2, r) per output.
  """
  config = VNMConfig.parse(config)
  k, n = _check_shape(shape, "shape")
  full, rest = divmod(k, config.m)
  return n * (config.n * full + min(config.n, rest))


def average_density(shapes: Mapping[str, tuple[int, int]],
                    configs: Mapping[str, VNMConfig | str] | VNMConfig | str) -> float:
  """Kept share of all entries of ``shapes`` under one config or a config per path."""
  uniform = not isinstance(configs, Mapping)
  kept = sum(kept_entries(s, configs if uniform else configs[p]) for p, s in shapes.items())
  return kept / sum(k * n for k, n in shapes.values())


def allocation_patterns(configs: Mapping[str, VNMConfig | str]) -> dict[str, VNMConfig]:
  """``{regex: config}`` matching exactly each path of an allocation (with or without a
  leading ``params/``), for ``tree_configs(configs=...)`` and ``convert_to_vnm``."""
  return {f"(^|/){re.escape(path)}$": VNMConfig.parse(c) for path, c in configs.items()}


def _check_shape(shape, where: str) -> tuple[int, int]:
  if (not isinstance(shape, (tuple, list)) or len(shape) != 2
      or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise ValueError(f"{where} must be a 2D kernel shape (in_features, out_features) of "
                     f"positive ints, got {shape!r}.")
  return shape[0], shape[1]


def _candidates(table, path: str, argument: str) -> dict[VNMConfig, float]:
  if not isinstance(table, Mapping) or not table:
    raise ValueError(f"{argument}[{path!r}] must be a non-empty mapping config -> number, got "
                     f"{table!r}.")
  out = {}
  for config, value in table.items():
    try:
      parsed = VNMConfig.parse(config)
    except (TypeError, ValueError) as error:
      raise type(error)(f"{argument}[{path!r}]: {error}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"{argument}[{path!r}][{str(parsed)!r}] must be a finite number, got "
                       f"{value!r}.")
    out[parsed] = float(value)
  return out


def _hull(points: list[tuple[float, float, VNMConfig]]) -> list[tuple[float, float, VNMConfig]]:
  """Lower convex hull of (cost, sensitivity) points, cheapest first, sensitivity falling."""
  hull: list[tuple[float, float, VNMConfig]] = []
  for point in sorted(points, key=lambda p: (p[0], p[1], str(p[2]))):
    if hull and point[1] >= hull[-1][1]:
      continue  # costs at least as much and is no better: dominated
    while len(hull) >= 2:
      (c0, s0, _), (c1, s1, _) = hull[-2], hull[-1]
      # Drop the middle point when it lies on or above the segment from hull[-2] to point.
      if (s1 - s0) * (point[0] - c0) >= (point[1] - s0) * (c1 - c0):
        hull.pop()
      else:
        break
    hull.append(point)
  return hull


def allocate_configs(sensitivities: Mapping[str, Mapping[VNMConfig | str, float]],
                     shapes: Mapping[str, tuple[int, int]], *,
                     density: float | VNMConfig | str | None = None,
                     costs: Mapping[str, Mapping[VNMConfig | str, float]] | None = None,
                     budget: float | None = None) -> dict[str, VNMConfig]:
  """A V:N:M config per kernel minimising the summed sensitivity under a budget.

  Args:
    sensitivities: ``{path: {config: sensitivity}}``, the candidates of each kernel with
      the penalty of pruning it that way (e.g. the calibration loss increase from pruning
      that kernel alone); finite, lower is better. Configs may be VNMConfigs or strings.
    shapes: ``{path: (K, N)}``, the same paths.
    density: kept entries over all kernels at most this share of their entries, in
      (0, 1]; or a config meaning the share that config keeps applied to every kernel.
      Costs are then the kernels' kept entries (:func:`kept_entries`).
    costs: instead of ``density``: ``{path: {config: cost}}`` for every candidate (e.g.
      estimated kernel time), with ``budget`` the most their sum may be.
    budget: the budget of ``costs``.

  Returns:
    ``{path: VNMConfig}``, in the order of ``sensitivities``.

  Raises:
    ValueError/TypeError: paths that differ between the arguments, bad shapes or
      numbers, both or neither budget, or a budget that even the cheapest candidate
      of every kernel exceeds.
  """
  if not isinstance(sensitivities, Mapping) or not sensitivities:
    raise ValueError(f"sensitivities must be a non-empty mapping path -> {{config: number}}, "
                     f"got {type(sensitivities).__name__}.")
  if not isinstance(shapes, Mapping) or set(shapes) != set(sensitivities):
    given = set(shapes) if isinstance(shapes, Mapping) else set()
    raise ValueError(f"shapes must have exactly the paths of sensitivities; missing "
                     f"{sorted(set(sensitivities) - given)[:4]}, extra "
                     f"{sorted(given - set(sensitivities))[:4]}.")
  if (density is None) == (costs is None) or (costs is None) != (budget is None):
    raise ValueError("give either density= or both costs= and budget= (got density="
                     f"{density!r}, costs={'given' if costs is not None else None}, "
                     f"budget={budget!r}).")
  table = {p: _candidates(t, p, "sensitivities") for p, t in sensitivities.items()}
  sizes = {p: _check_shape(tuple(shapes[p]) if isinstance(shapes[p], list) else shapes[p],
                           f"shapes[{p!r}]") for p in table}
  if density is not None:
    if isinstance(density, (VNMConfig, str)):
      density = average_density(sizes, density)
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
        or not 0 < density <= 1:
      raise ValueError(f"density must be in (0, 1] or a config such as '64:2:5', got "
                       f"{density!r}.")
    cost_table = {p: {c: float(kept_entries(sizes[p], c)) for c in t} for p, t in table.items()}
    budget = density * sum(k * n for k, n in sizes.values())
  else:
    if not isinstance(costs, Mapping) or set(costs) != set(table):
      raise ValueError("costs must have exactly the paths of sensitivities.")
    cost_table = {p: _candidates(costs[p], p, "costs") for p in table}
    for p, t in table.items():
      if set(cost_table[p]) != set(t):
        raise ValueError(f"costs[{p!r}] must price exactly the candidates of "
                         f"sensitivities[{p!r}]: {sorted(map(str, t))}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
        or not math.isfinite(budget):
      raise ValueError(f"budget must be a finite number, got {budget!r}.")

  hulls = {p: _hull([(cost_table[p][c], s, c) for c, s in t.items()]) for p, t in table.items()}
  choice = {p: 0 for p in hulls}
  spent = sum(h[0][0] for h in hulls.values())
  if spent > budget * (1 + 1e-12):
    raise ValueError(f"the budget ({budget:.6g}) is below the cost of the cheapest candidate of "
                     f"every kernel ({spent:.6g}); add sparser candidates or raise the budget.")
  # Upgrades along each hull, best sensitivity decrease per unit of cost first. Hull
  # slopes increase along a kernel, so its upgrades come up in order.
  upgrades = sorted(((h[i + 1][1] - h[i][1]) / (h[i + 1][0] - h[i][0]), p, i)
                    for p, h in hulls.items() for i in range(len(h) - 1))
  blocked = set()
  for _, path, i in upgrades:
    if path in blocked or choice[path] != i:
      continue
    step = hulls[path][i + 1][0] - hulls[path][i][0]
    if spent + step <= budget * (1 + 1e-12):
      choice[path], spent = i + 1, spent + step
    else:
      blocked.add(path)  # later upgrades of this kernel build on this one
  return {p: hulls[p][choice[p]][2] for p in table}
