"""The channel-permutation search: starts, local steps, drivers and :func:`find_permutation`.

See :mod:`vnm_jax.permutation_search` for the method. The objective (the kept score and
its jitted costs) is in :mod:`.objective`, the balanced assignments in :mod:`.assignment`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import check_rule
from vnm_jax.permutation import Permutation
from vnm_jax.permutation_search.assignment import (balanced_assignment, labels_to_slots,
                                                   slots_to_labels, zigzag_deal)
from vnm_jax.permutation_search.objective import (Problem, group_block_kept, make_problem,
                                                  row_benefits, scores_matrix, slot_costs,
                                                  subset_tables, unstructured_kept_score)

Method = Literal["cocluster", "paper"]
METHODS = ("cocluster", "paper")

# Rounds of (input step, output step) the paper reconstruction runs.
_PAPER_ROUNDS = 2
# The local search runs an output step after every _OUTPUT_EVERY input slot steps and
# stops after _PATIENCE cycles (one step per slot) in a row that each close less than
# ``tolerance`` (find_permutation's argument) of the gap between the start and
# unstructured pruning, or after _MAX_CYCLES cycles.
_OUTPUT_EVERY = 2
_PATIENCE = 2
_MAX_CYCLES = 60
# Re-slotting restarts of the local search once it has stalled.
_RESLOT_ROUNDS = 1
# Work of one input slot step (candidates x groups x output rows): beyond it the groups
# are split into batches that solve separate assignments (only very large layers).
_MAX_SLOT_WORK = 1 << 28
# Lloyd iterations of the block x type model (it converges in 5-15 on real weights).
_TYPE_MODEL_ITERATIONS = 30
# Subspace iterations for the second singular vectors of the co-clustering start.
_SUBSPACE_ITERATIONS = 10


# ----------------------------------------------------------------------------------
# Starts


def _zigzag_start(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
  """The paper's start: inputs and outputs dealt in zig-zag order of total score."""
  s = problem.scores
  kp, np_ = s.shape
  group_caps = np.full(problem.groups_count, problem.m)
  group_caps[-1] -= kp - problem.k
  groups = zigzag_deal(np.argsort(-s[:problem.k].sum(1), kind="stable"), group_caps,
                       problem.k, kp)
  blocks = zigzag_deal(np.argsort(-s[:, :problem.n].sum(0), kind="stable"),
                       problem.block_capacities(), problem.n, np_)
  return groups, blocks


def _second_singular_vectors(matrix: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Second left/right singular vectors of the degree-normalised matrix D1^-1/2 A D2^-1/2.

  Subspace iterations on 6 vectors: the top pair is (sqrt(d1), sqrt(d2)) with
  singular value 1; only the order of the second pair's entries is used (to cut
  quantiles), so a rough estimate does.
  """
  rows = np.maximum(matrix.sum(1), 1e-30)
  columns = np.maximum(matrix.sum(0), 1e-30)
  normalised = (matrix / np.sqrt(rows)[:, None] / np.sqrt(columns)[None]).astype(np.float32)
  width = min(6, *matrix.shape)
  basis = np.random.default_rng(seed).standard_normal((matrix.shape[1], width)).astype(np.float32)
  for _ in range(_SUBSPACE_ITERATIONS):
    basis, _ = np.linalg.qr(normalised.T @ (normalised @ basis))
  left, _, right_t = np.linalg.svd(normalised @ basis, full_matrices=False)
  right = basis @ right_t.T
  return left[:, 1] / np.sqrt(rows), right[:, 1] / np.sqrt(columns)


def _cocluster_start(problem: Problem, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Blocks and type-transversal groups from a balanced block x type co-clustering.

  Model: channel c has type t (a slot, the same in every group), row o has block r;
  block r keeps the 4 types with the largest total score over its rows. Lloyd
  iterations alternate the channel and row assignments (each a balanced
  transportation problem), starting from quantiles of the second singular vectors.
  """
  k, n, m = problem.k, problem.n, problem.m
  s = problem.scores[:k, :n].astype(np.float64)
  type_caps, block_caps = problem.type_capacities(), problem.block_capacities()
  types_count, blocks_count = m, problem.blocks_count
  left, right = _second_singular_vectors(s, seed)
  channel_type = np.empty(k, np.intp)
  channel_type[np.argsort(left, kind="stable")] = np.repeat(np.arange(types_count), type_caps)
  row_block = np.empty(n, np.intp)
  row_block[np.argsort(right, kind="stable")] = np.repeat(np.arange(blocks_count), block_caps)

  def kept_types(type_by_block: np.ndarray) -> np.ndarray:
    keep = np.zeros_like(type_by_block)
    top = np.argsort(-type_by_block, axis=0, kind="stable")[:KEPT_COLUMNS]
    np.put_along_axis(keep, top, 1.0, axis=0)
    return keep

  best = -np.inf
  for iteration in range(_TYPE_MODEL_ITERATIONS):
    # The first assignments start from a regret-greedy deal: the quantile cut is far
    # from optimal; later ones start from the previous labels.
    warm = iteration > 0
    channel_by_block = s @ np.eye(blocks_count)[row_block]  # (K, R)
    type_by_block = np.eye(types_count)[channel_type].T @ channel_by_block  # (M, R)
    channel_type = balanced_assignment(channel_by_block @ kept_types(type_by_block).T,
                                       type_caps, channel_type if warm else None)
    type_by_row = np.eye(types_count)[channel_type].T @ s  # (M, N)
    type_by_block = type_by_row @ np.eye(blocks_count)[row_block]
    row_block = balanced_assignment(type_by_row.T @ kept_types(type_by_block),
                                    block_caps, row_block if warm else None)
    type_by_block = type_by_row @ np.eye(blocks_count)[row_block]
    objective = float(np.sort(type_by_block, axis=0)[-KEPT_COLUMNS:].sum())
    if objective <= best * (1 + 1e-12):
      break
    best = objective
  # Within a type, channels go to groups in order of total score.
  slots = labels_to_slots(channel_type, type_caps, k, problem.scores.shape[0],
                          order_key=s.sum(1))  # (M, G)
  groups = slots.T.copy()
  # Padding channels must sit in the last group; labels_to_slots put them at the
  # end of the short types, which is the last group's row of slots.
  blocks = labels_to_slots(row_block, block_caps, n, problem.scores.shape[1])
  return groups, blocks


# ----------------------------------------------------------------------------------
# Local steps


def _input_slot_step(problem: Problem, device_scores: jax.Array, groups: np.ndarray,
                     blocks: np.ndarray, slot: int, rng: np.random.Generator) -> np.ndarray:
  """Takes slot ``slot``'s channel out of every group and re-inserts them optimally.

  The cost of every (channel, group) pair is the group's exact kept score with the
  channel (column-L1 rule); scipy's linear_sum_assignment maximises the total.
  Padding channels stay where they are. When G^2 x Np exceeds _MAX_SLOT_WORK the
  groups are dealt at random (``rng``) into batches of equal size and each batch
  solves its own assignment: the cost computation grows as G x batch instead of G^2.
  ``device_scores`` is the (Kp + 1, Np) score matrix whose last row is a zero channel
  that fills short batches, so the jitted function sees one shape per layer.
  """
  groups = groups.copy()
  movable = np.flatnonzero(groups[:, slot] < problem.k)
  if len(movable) < 2:
    return groups
  largest = max(2, _MAX_SLOT_WORK // (problem.groups_count * problem.scores.shape[1]))
  if len(movable) <= largest:
    batches = [np.arange(problem.groups_count)]  # all groups: one shape per layer
  else:
    batches = np.array_split(rng.permutation(movable), -(-len(movable) // largest))
  width = max(len(batch) for batch in batches)
  zero_channel = device_scores.shape[0] - 1
  device_blocks = jnp.asarray(blocks)
  for batch in batches:
    members = np.full((width, problem.m), zero_channel)
    members[:len(batch)] = groups[batch]
    costs = np.asarray(slot_costs(device_scores, device_blocks,
                                  jnp.asarray(np.delete(members, slot, axis=1)),
                                  jnp.asarray(members[:, slot])), np.float64)
    inside = np.flatnonzero(groups[batch, slot] < problem.k)
    if len(inside) < 2:
      continue
    chosen, target = linear_sum_assignment(costs[np.ix_(inside, inside)], maximize=True)
    groups[batch[inside[target]], slot] = members[inside[chosen], slot]
  return groups


def _output_step(problem: Problem, device_scores: jax.Array, groups: np.ndarray,
                 blocks: np.ndarray) -> np.ndarray:
  """Re-clusters rows: every row to the block where it keeps most, block sizes fixed.

  The blocks' kept columns are held fixed while rows move (a balanced Lloyd step).
  """
  benefit = np.asarray(row_benefits(device_scores, jnp.asarray(groups), jnp.asarray(blocks)),
                       np.float64)
  capacities = problem.block_capacities()
  labels = balanced_assignment(benefit[:, :problem.n].T, capacities,
                               slots_to_labels(blocks, problem.n))
  return labels_to_slots(labels, capacities, problem.n, problem.scores.shape[1])


def _output_slot_step(problem: Problem, groups: np.ndarray, blocks: np.ndarray) -> np.ndarray:
  """The paper's output step: per slot, re-insert one row of every block by assignment.

  Exact under the column-L1 rule: per (row, group, 4-subset) the row's top-2 score is
  tabulated (``row_kept``, memory N x G x C(M,4)); a block's kept score is then a sum
  of table entries at the subset its column L1s choose.
  """
  blocks = blocks.copy()
  m = problem.m
  pairs, subset_pairs = subset_tables(m)
  code = np.full(1 << m, -1, np.intp)
  for index, subset in enumerate(itertools.combinations(range(m), KEPT_COLUMNS)):
    code[sum(1 << j for j in subset)] = index
  rows_by_group = problem.scores[groups].transpose(2, 0, 1)  # (Np, G, M)
  pair_sums = rows_by_group[..., pairs[:, 0]] + rows_by_group[..., pairs[:, 1]]
  row_kept = pair_sums[..., subset_pairs].max(-1)  # (Np, G, C)
  block_l1 = rows_by_group[blocks].sum(1)  # (R, G, M)
  block_kept = row_kept[blocks].sum(1)  # (R, G, C)
  for slot in range(problem.v):
    movable = np.flatnonzero(blocks[:, slot] < problem.n)
    if len(movable) < 2:
      continue
    taken = blocks[movable, slot]
    fixed_l1 = block_l1[movable] - rows_by_group[taken]
    fixed_kept = block_kept[movable] - row_kept[taken]
    l1 = fixed_l1[None] + rows_by_group[taken][:, None]  # (C, B, G, M)
    top = np.argsort(-l1, axis=-1, kind="stable")[..., :KEPT_COLUMNS]
    subset = code[(1 << top).sum(-1)]  # (C, B, G)
    kept = (np.take_along_axis(fixed_kept[None], subset[..., None], axis=-1)[..., 0]
            + np.take_along_axis(row_kept[taken][:, None], subset[..., None], axis=-1)[..., 0])
    chosen, target = linear_sum_assignment(kept.sum(-1), maximize=True)
    placed = taken[chosen]
    blocks[movable[target], slot] = placed
    block_l1[movable[target]] = fixed_l1[target] + rows_by_group[placed]
    block_kept[movable[target]] = fixed_kept[target] + row_kept[placed]
  return blocks


# ----------------------------------------------------------------------------------
# Drivers


class _Best:
  """The best grouping seen so far under the column-L1 search objective."""

  def __init__(self, device_scores: jax.Array, groups: np.ndarray, blocks: np.ndarray):
    self.device_scores = device_scores
    self.groups, self.blocks = groups, blocks
    self.kept = self.evaluate(groups, blocks)

  def evaluate(self, groups: np.ndarray, blocks: np.ndarray) -> float:
    kept = group_block_kept(self.device_scores, jnp.asarray(groups), jnp.asarray(blocks))
    return float(np.asarray(kept, np.float64).sum())

  def offer(self, groups: np.ndarray, blocks: np.ndarray) -> float:
    """Records the grouping if it is better; returns its kept score."""
    kept = self.evaluate(groups, blocks)
    if kept > self.kept:
      self.groups, self.blocks, self.kept = groups, blocks, kept
    return kept


@dataclasses.dataclass
class _Search:
  """What every search step needs: the problem, its device copy, the clock, the best."""

  problem: Problem
  deadline: float
  rng: np.random.Generator
  inputs_matter: bool
  outputs_matter: bool
  device_scores: jax.Array = dataclasses.field(init=False)
  best: _Best = dataclasses.field(init=False)

  def __post_init__(self):
    # One zero channel appended: it fills short batches of the input step.
    self.device_scores = jnp.asarray(np.pad(self.problem.scores, ((0, 1), (0, 0))))
    self.best = _Best(self.device_scores, *self.problem.identity())

  def expired(self) -> bool:
    return time.monotonic() >= self.deadline


def _paper_search(search: _Search) -> None:
  """The reconstruction of the paper's procedure (zig-zag start, slot-by-slot steps)."""
  problem = search.problem
  groups, blocks = _zigzag_start(problem)
  if not search.outputs_matter:
    blocks = search.best.blocks
  search.best.offer(groups, blocks)
  for _ in range(_PAPER_ROUNDS):
    for slot in range(problem.m if search.inputs_matter else 0):
      if not search.expired():
        groups = _input_slot_step(problem, search.device_scores, groups, blocks, slot,
                                  search.rng)
    if search.outputs_matter and not search.expired():
      blocks = _output_slot_step(problem, groups, blocks)
    search.best.offer(groups, blocks)


def _local_search(search: _Search, groups: np.ndarray, blocks: np.ndarray,
                  tolerance: float) -> None:
  """Input slot steps with an output step after every few, until a cycle stops paying.

  A cycle is one input step per slot. The search stops after _PATIENCE cycles in a
  row that raise the best kept score by less than ``tolerance``.
  """
  problem = search.problem
  stalled = 0
  for _ in range(_MAX_CYCLES):
    before = search.best.kept
    for slot in range(problem.m if search.inputs_matter else 1):
      if search.expired():
        return
      if search.inputs_matter:
        groups = _input_slot_step(problem, search.device_scores, groups, blocks, slot,
                                  search.rng)
      if search.outputs_matter and (slot % _OUTPUT_EVERY == _OUTPUT_EVERY - 1
                                    or slot == problem.m - 1 or not search.inputs_matter):
        blocks = _output_step(problem, search.device_scores, groups, blocks)
    search.best.offer(groups, blocks)
    stalled = stalled + 1 if search.best.kept - before < tolerance else 0
    if stalled >= _PATIENCE:
      return


def run_search(problem: Problem, method: str, search_outputs: bool, seed: int,
               deadline: float, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
  """Returns the best (groups, blocks) found before ``deadline`` (time.monotonic())."""
  identity_groups, identity_blocks = problem.identity()
  # Outputs matter only when blocks share columns: M > 4, V > 1 and several blocks.
  search = _Search(
      problem=problem, deadline=deadline, rng=np.random.default_rng(seed),
      inputs_matter=problem.groups_count > 1,
      outputs_matter=(search_outputs and problem.m > KEPT_COLUMNS and problem.v > 1
                      and problem.blocks_count > 1))
  best = search.best
  if not (search.inputs_matter or search.outputs_matter):
    return best.groups, best.blocks
  if method == "paper":
    _paper_search(search)
    return best.groups, best.blocks

  if search.outputs_matter and search.inputs_matter:
    groups, blocks = _cocluster_start(problem, seed)
  else:
    groups, blocks = _zigzag_start(problem)
    if not search.outputs_matter:
      blocks = identity_blocks
  best.offer(groups, blocks)
  gap = (unstructured_kept_score(problem.scores[:problem.k, :problem.n], 2 / problem.m)
         - best.kept)
  stall = tolerance * max(gap, 0.0)
  _local_search(search, groups, blocks, stall)
  for _ in range(_RESLOT_ROUNDS if search.inputs_matter else 0):
    if search.expired():
      break
    # Shuffle each group's channels among its slots (padding stays last) so the next
    # input steps take different channels out together; the best result is kept.
    shuffled = best.groups.copy()
    for group in shuffled:
      real = group < problem.k
      group[real] = search.rng.permutation(group[real])
    _local_search(search, shuffled, best.blocks, stall)
  return best.groups, best.blocks


# ----------------------------------------------------------------------------------
# The public search


def find_permutation(kernel, config: VNMConfig | str, *, scores=None, rule: str = "column_l1",
                     time_budget_s: float | None = None, seed: int = 0,
                     method: Method = "cocluster", search_outputs: bool = True,
                     tolerance: float = 5e-4, in_axes=None) -> Permutation:
  """Input and output channel orderings that make V:N:M pruning keep more score.

  Args:
    kernel: (in_features, out_features) Flax kernel (or nD with ``in_axes``: the
      permutation is then of its 2D view, as in :func:`vnm_jax.as_matrix`).
    config: a VNMConfig or "V:N:M" string.
    scores: importance scores of the kernel's shape (finite, >= 0); default |kernel|.
    rule: the mask rule whose kept score is compared with the identity's at the end
      ("column_l1" or "exhaustive"); the search itself optimises column-L1.
    time_budget_s: stop the search after about this many seconds and return the best
      found so far (the start and at least one step always run). None: run until a
      round gains less than 1e-5 of the kept score.
    seed: seeds the singular-vector start and the re-slotting; the result is
      deterministic for a seed when no time budget cuts the search short.
    method: "cocluster" (this library's search) or "paper" (the reconstruction of
      the paper's procedure, the benchmark baseline).
    search_outputs: False keeps the output order (``outputs`` is None), e.g. when the
      output order cannot be undone or folded.
    tolerance: the local search stops after two cycles in a row that each close less
      than this share of the gap between its start and unstructured pruning (0: go
      on while anything improves, up to 60 cycles or the time budget).
    in_axes: contraction axes of an nD kernel.

  Returns:
    ``Permutation(inputs, outputs)`` of int32 numpy arrays: ``inputs`` orders axis 0
    (in_features) and ``outputs`` axis 1 (out_features) of the 2D view, so the
    pruned groups are formed on ``kernel[inputs][:, outputs]``. Never keeps less
    than the identity; sides on which no ordering helps (outputs for 2:4, V = 1 or a
    single block) are None.
  """
  config = VNMConfig.parse(config)
  check_rule(rule)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if time_budget_s is not None and (isinstance(time_budget_s, bool) or not (
      isinstance(time_budget_s, (int, float)) and time_budget_s > 0)):
    raise ValueError(f"time_budget_s must be a positive number of seconds or None, got "
                     f"{time_budget_s!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {seed!r}.")
  if seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
  if not isinstance(search_outputs, (bool, np.bool_)):
    raise TypeError(f"search_outputs must be True or False, got {search_outputs!r}.")
  if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float))
                                         and 0 <= tolerance < 1):
    raise ValueError(f"tolerance must be a share of the gap in [0, 1), got {tolerance!r}.")
  started = time.monotonic()
  deadline = math.inf if time_budget_s is None else started + time_budget_s
  matrix = scores_matrix(kernel, scores, in_axes)
  problem = make_problem(matrix, config)
  groups, blocks = run_search(problem, method, search_outputs, int(seed), deadline, tolerance)
  identity_groups, identity_blocks = problem.identity()
  if problem.kept(groups, blocks, rule) <= problem.kept(identity_groups, identity_blocks, rule):
    groups, blocks = identity_groups, identity_blocks
  inputs = groups.ravel()
  outputs = blocks.ravel()
  inputs = inputs[inputs < problem.k].astype(np.int32)
  outputs = outputs[outputs < problem.n].astype(np.int32)
  identity_in = np.array_equal(inputs, np.arange(problem.k))
  identity_out = np.array_equal(outputs, np.arange(problem.n))
  return Permutation(None if identity_in else inputs, None if identity_out else outputs)

