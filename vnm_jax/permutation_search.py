"""Searching channel permutations that make a kernel keep more score under V:N:M pruning.

A Flax kernel is (in_features, out_features) = (K, N). V:N:M groups M consecutive
inputs (axis 0) and V consecutive outputs (axis 1) into a block that keeps 4 whole
input columns, then 2 of those 4 entries per output row. Reordering the inputs
decides which channels compete inside an M group; reordering the outputs decides
which rows must agree on their 4 columns. :func:`find_permutation` returns a
:class:`~vnm_jax.permutation.Permutation` that maximises the score kept by pruning
``kernel[inputs][:, outputs]``; the mask in original coordinates is then
``vnm_mask(kernel, config, permutation=p)`` and needs no change to the model.

The search (``method="cocluster"``, the default):

1. Co-clustering start. Output rows are cut into the R = N/V blocks and input
   channels into M "types" (one slot of every M group) at quantiles of the second
   singular vectors of the degree-normalised score matrix; both partitions are then
   refined by a balanced Lloyd iteration on a block x type model in which every
   block keeps its 4 strongest types. Groups are dealt one channel of each type, so
   the rows of a block tend to agree on which 4 columns of each group matter.
2. Exact local search. An input step per slot takes the channel in slot s out of
   every group and re-inserts them by a linear assignment
   (scipy.optimize.linear_sum_assignment) whose costs are the exact kept score of
   every channel in every group under the column-L1 rule (a jitted, vectorised
   computation); after every two input steps an output step re-clusters the rows:
   every row goes to the block where it keeps most given the blocks' current
   columns, block sizes fixed (a balanced transportation problem, solved exactly by
   cycle cancelling). It stops when two cycles in a row each close less than
   ``tolerance`` (default 0.05 %) of the gap to unstructured pruning.
3. Re-slotting: the channels of each group are shuffled among its slots (seeded) and
   the local search runs again from the best grouping, so that the input steps take
   different channels out together; the better result is kept.

``method="paper"`` is this project's reconstruction of the paper's procedure
(zig-zag deal by total score, then two rounds of input and output slot-by-slot
linear assignments); it is kept as the baseline the benchmark compares against.

Whatever the method, the result is never worse than the identity: the kept score
under the requested rule is compared at the end and the identity returned when it
is not beaten. The search optimises the column-L1 rule's score; with
``rule="exhaustive"`` that is a surrogate and only the final comparison uses the
exhaustive rule.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import RULES, as_matrix
from vnm_jax.permutation import Permutation, validate_permutation

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
# Elements of one chunk of the input-step cost computation (bounds memory).
_COST_CHUNK_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------
# Kept score of a grouping (exact, float64, numpy)


def _top2_sum(values: np.ndarray, axis: int) -> np.ndarray:
  """Sum of the 2 largest entries along ``axis`` (size >= 2)."""
  part = -np.partition(-values, 1, axis=axis)
  return np.take(part, 0, axis=axis) + np.take(part, 1, axis=axis)


@functools.lru_cache(maxsize=None)
def _subset_tables(m: int) -> tuple[np.ndarray, np.ndarray]:
  """The C(M,2) column pairs (P, 2) and, per C(M,4) subset, its 6 pairs (C, 6)."""
  pairs = list(itertools.combinations(range(m), 2))
  pair_index = {p: i for i, p in enumerate(pairs)}
  subsets = itertools.combinations(range(m), KEPT_COLUMNS)
  subset_pairs = [[pair_index[p] for p in itertools.combinations(s, 2)] for s in subsets]
  return np.array(pairs, np.intp), np.array(subset_pairs, np.intp)


def _blocks_kept(blocks: np.ndarray, rule: str) -> np.ndarray:
  """Kept score of every block (float64); blocks (..., M, V): one block's M columns x V rows."""
  m = blocks.shape[-2]
  if m == KEPT_COLUMNS:
    return _top2_sum(blocks, axis=-2).sum(-1, dtype=np.float64)
  if rule == "column_l1":
    # Column L1 in the scores' float32, ties to the lower index, as in vnm_mask.
    top = np.argsort(-blocks.sum(-1), axis=-1, kind="stable")[..., :KEPT_COLUMNS]
    kept_columns = np.take_along_axis(blocks, top[..., None], axis=-2)
    return _top2_sum(kept_columns, axis=-2).sum(-1, dtype=np.float64)
  pairs, subset_pairs = _subset_tables(m)
  pair_sums = blocks[..., pairs[:, 0], :] + blocks[..., pairs[:, 1], :]  # (..., P, V)
  best = np.full(blocks.shape[:-2], -np.inf)
  for pair_ids in subset_pairs:  # C(M,4) subsets, each kept row keeps its best of 6 pairs
    best = np.maximum(best, pair_sums[..., pair_ids, :].max(-2).sum(-1, dtype=np.float64))
  return best


def _grouping_kept(scores: np.ndarray, groups: np.ndarray, blocks: np.ndarray,
                   rule: str) -> float:
  """Kept score of padded scores (Kp, Np) grouped as groups (G, M) x blocks (R, V)."""
  grouped = scores[groups]  # (G, M, Np)
  pairs = math.comb(groups.shape[1], 2) if rule == "exhaustive" else 1
  per_chunk = max(1, _COST_CHUNK_ELEMENTS // (8 * grouped.shape[0] * grouped.shape[1]
                                              * blocks.shape[1] * pairs))
  total = 0.0
  for start in range(0, len(blocks), per_chunk):  # chunks of row blocks bound memory
    rows = blocks[start:start + per_chunk]
    chunk = grouped[:, :, rows].transpose(0, 2, 1, 3)  # (G, r, M, V)
    total += float(_blocks_kept(chunk, rule).sum())
  return total


# ----------------------------------------------------------------------------------
# The padded problem and its state


@dataclasses.dataclass
class _Problem:
  """Scores padded to (Kp, Np) with zeros; channels >= k and rows >= n are padding.

  Padding channels and rows stay in the last group / block (where the compressed
  format puts them) and never move; a zero never beats a real score in kept terms.
  """

  scores: np.ndarray  # (Kp, Np) float32
  k: int
  n: int
  v: int
  m: int

  @property
  def groups_count(self) -> int:
    return self.scores.shape[0] // self.m

  @property
  def blocks_count(self) -> int:
    return self.scores.shape[1] // self.v

  def identity(self) -> tuple[np.ndarray, np.ndarray]:
    kp, np_ = self.scores.shape
    return (np.arange(kp).reshape(self.groups_count, self.m),
            np.arange(np_).reshape(self.blocks_count, self.v))

  def kept(self, groups: np.ndarray, blocks: np.ndarray, rule: str = "column_l1") -> float:
    return _grouping_kept(self.scores, groups, blocks, rule)

  def type_capacities(self) -> np.ndarray:
    """Real channels per slot when every group holds one per slot (padding fills the last)."""
    padding = self.scores.shape[0] - self.k
    return np.array([self.groups_count - (s >= self.m - padding) for s in range(self.m)])

  def block_capacities(self) -> np.ndarray:
    capacities = np.full(self.blocks_count, self.v)
    capacities[-1] -= self.scores.shape[1] - self.n
    return capacities


def _make_problem(scores: np.ndarray, config: VNMConfig) -> _Problem:
  k, n = scores.shape
  kp, np_ = -(-k // config.m) * config.m, -(-n // config.v) * config.v
  padded = np.zeros((kp, np_), np.float32)
  padded[:k, :n] = scores
  return _Problem(padded, k, n, config.v, config.m)


def _labels_to_slots(labels: np.ndarray, capacities: np.ndarray, real: int, padded: int,
                     order_key: np.ndarray | None = None) -> np.ndarray:
  """Members (P, size) of each part from a label per real item (0..real-1).

  Parts hold ``capacities`` real items; the places left free (the tails of the short
  parts, which are the last ones) take the padding items real..padded-1. Within a
  part, items are sorted by ``order_key`` descending (ties by index).
  """
  parts = len(capacities)
  size = padded // parts
  members = np.empty((parts, size), np.intp)
  for part in range(parts):
    items = np.flatnonzero(labels == part)
    if order_key is not None:
      items = items[np.argsort(-order_key[items], kind="stable")]
    members[part, :len(items)] = items
    members[part, len(items):] = -1
  padding = iter(range(real, padded))
  for part, slot in zip(*np.nonzero(members == -1)):
    members[part, slot] = next(padding)
  return members


def _slots_to_labels(members: np.ndarray, real: int) -> np.ndarray:
  labels = np.empty(real, np.intp)
  part, _ = np.nonzero(members < real)
  labels[members[members < real]] = part
  return labels


# ----------------------------------------------------------------------------------
# Balanced assignment: n items into parts of fixed sizes, maximising total benefit


def _greedy_balanced(benefit: np.ndarray, capacities: np.ndarray) -> np.ndarray:
  """Items in order of regret (best minus second-best benefit) take their best free part."""
  n, parts = benefit.shape
  ranked = np.sort(benefit, axis=1)
  regret = ranked[:, -1] - ranked[:, -2]
  preferences = np.argsort(-benefit, axis=1, kind="stable")
  left = capacities.copy()
  labels = np.empty(n, np.intp)
  for item in np.argsort(-regret, kind="stable"):
    for part in preferences[item]:
      if left[part]:
        labels[item] = part
        left[part] -= 1
        break
  return labels


def _balanced_assignment(benefit: np.ndarray, capacities: np.ndarray,
                         labels: np.ndarray | None = None) -> np.ndarray:
  """Optimal labels (n,) for benefit (n, P), part p taking exactly capacities[p] items.

  A transportation problem with few parts. Start from ``labels`` (or, when None, a
  regret-greedy deal) and cancel positive cycles of moves between parts until none
  is left, which is the optimality condition. Edge a -> b of the part graph carries
  the best gain of moving one item of a to b. Every pass first applies all disjoint
  positive swaps (2-cycles) at once, best first; when none is left, Bellman-Ford
  longest paths find a longer positive cycle. Much faster here than a linear
  assignment on columns repeated per capacity (n x n).
  """
  benefit = np.asarray(benefit, np.float64)
  n, parts = benefit.shape
  if parts == 1:
    return np.zeros(n, np.intp)
  items = np.arange(n)
  labels = _greedy_balanced(benefit, capacities) if labels is None else labels.copy()
  tolerance = 1e-12 * max(1.0, float(np.abs(benefit).max()))
  for _ in range(n * parts):  # every pass gains > tolerance; this cap never binds
    gain = benefit - benefit[items, labels][:, None]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=parts)
    present = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
    sorted_gain = gain[order]
    edge = np.full((parts, parts), -np.inf)
    edge[present] = np.maximum.reduceat(sorted_gain, starts, axis=0)
    # The item achieving each edge: the first position in its part with that gain.
    hits = sorted_gain == edge[labels[order]]
    first = np.minimum.reduceat(np.where(hits, items[:, None], n), starts, axis=0)
    mover = np.zeros((parts, parts), np.intp)
    mover[present] = order[np.minimum(first, n - 1)]
    np.fill_diagonal(edge, -np.inf)
    swap_gain = np.triu(edge + edge.T, 1)
    sources, targets = np.nonzero(swap_gain > tolerance)
    if len(sources):
      busy = np.zeros(parts, bool)
      for index in np.argsort(-swap_gain[sources, targets], kind="stable"):
        a, b = sources[index], targets[index]
        if not (busy[a] or busy[b]):
          busy[a] = busy[b] = True
          labels[mover[a, b]], labels[mover[b, a]] = b, a
      continue
    distance, predecessor = np.zeros(parts), np.full(parts, -1)
    on_cycle = -1
    for step in range(parts + 1):
      candidate = distance[:, None] + edge
      best_from = np.argmax(candidate, axis=0)
      best = candidate[best_from, np.arange(parts)]
      improved = best > distance + tolerance
      if not improved.any():
        break
      distance = np.where(improved, best, distance)
      predecessor = np.where(improved, best_from, predecessor)
      if step == parts:
        on_cycle = int(np.flatnonzero(improved)[0])
    if on_cycle < 0:
      return labels
    for _ in range(parts):  # walk back until surely inside the cycle
      on_cycle = predecessor[on_cycle]
    cycle = [on_cycle]
    while (previous := predecessor[cycle[-1]]) != on_cycle:
      cycle.append(previous)
    cycle.reverse()  # edges cycle[i] -> cycle[i + 1]
    moves = [(mover[a, b], b) for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    if sum(gain[item, target] for item, target in moves) <= tolerance:
      return labels
    for item, target in moves:
      labels[item] = target
  return labels


# ----------------------------------------------------------------------------------
# Jitted cost computations


def _top_two(values: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """The largest and second-largest entries along ``axis`` (two max passes, no sort)."""
  first_index = jnp.argmax(values, axis=axis, keepdims=True)
  positions = jax.lax.broadcasted_iota(jnp.int32, values.shape, axis)
  first = jnp.max(values, axis=axis)
  second = jnp.max(jnp.where(positions == first_index, -jnp.inf, values), axis=axis)
  return first, second


def _rank_top(l1: jax.Array, keep: int, axis: int) -> jax.Array:
  """Mask of the ``keep`` largest entries along ``axis`` (ties to the lower index, as in
  vnm_mask), from pairwise comparisons: sorts and gathers are slow in XLA on CPU."""
  own = jnp.expand_dims(l1, axis + 1)  # entry j along axis
  other = jnp.expand_dims(l1, axis)  # entry i along axis + 1
  shape = jnp.broadcast_shapes(own.shape, other.shape)
  own_index = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  other_index = jax.lax.broadcasted_iota(jnp.int32, shape, axis + 1)
  ahead = (other > own) | ((other == own) & (other_index < own_index))
  return ahead.sum(axis=axis + 1) < keep


@jax.jit
def _slot_costs(scores: jax.Array, blocks: jax.Array, others: jax.Array,
                candidates: jax.Array) -> jax.Array:
  """Kept score of every group after inserting every candidate, column-L1 rule.

  scores: (Kp, Np); blocks: (R, V) the rows of every block; others: (G, M-1) the
  members each group keeps; candidates: (C,) the channels taken out. Returns (C, G).

  With a group's members fixed, a candidate x changes block r only when its L1 beats
  the 4th largest member L1 (tau). Then the block keeps the top 3 members and x, and
  a row keeps t1 + max(t2, x) where t1 >= t2 are its top two among those 3;
  otherwise the block keeps ``base``, its top-4 members' 2:4 score.
  """
  fixed = scores[others][:, :, blocks]  # (G, M-1, R, V)
  members = fixed.shape[1]
  column_l1 = fixed.sum(-1)  # (G, M-1, R)
  in_top3 = _rank_top(column_l1, 3, axis=1)
  top1, top2 = _top_two(jnp.where(in_top3[..., None], fixed, -jnp.inf), axis=1)
  top1_sum = top1.sum(-1)  # (G, R)
  if members >= KEPT_COLUMNS:
    in_top4 = _rank_top(column_l1, 4, axis=1)
    base = sum(_top_two(jnp.where(in_top4[..., None], fixed, -jnp.inf), axis=1)).sum(-1)
    tau = jnp.where(in_top4 & ~in_top3, column_l1, 0.0).sum(1)
  else:  # M == 4: every column is kept
    base = jnp.zeros_like(top1_sum)
    tau = jnp.full_like(top1_sum, -jnp.inf)
  inserted_values = scores[candidates][:, blocks]  # (C, R, V)
  inserted_l1 = inserted_values.sum(-1)  # (C, R)

  def chunk_costs(chunk):
    values, l1 = chunk
    with_candidate = jnp.maximum(top2[None], values[:, None]).sum(-1)  # (c, G, R)
    return jnp.where(l1[:, None] > tau[None], top1_sum[None] + with_candidate,
                     base[None]).sum(-1)

  count = candidates.shape[0]
  chunk = max(1, min(count, _COST_CHUNK_ELEMENTS // max(1, top2.size)))
  if chunk == count:  # one chunk: no loop (compiles faster)
    return chunk_costs((inserted_values, inserted_l1))
  padded = -(-count // chunk) * chunk
  pad = ((0, padded - count),)
  chunks = (jnp.pad(inserted_values, pad + ((0, 0), (0, 0))).reshape(
                -1, chunk, *inserted_values.shape[1:]),
            jnp.pad(inserted_l1, pad + ((0, 0),)).reshape(-1, chunk, inserted_l1.shape[1]))
  return jax.lax.map(chunk_costs, chunks).reshape(padded, -1)[:count]


def _top2_of_4(values: jax.Array) -> jax.Array:
  """Sum of the 2 largest of 4 entries along axis 1 (a comparison network)."""
  high_a = jnp.maximum(values[:, 0], values[:, 1])
  low_a = jnp.minimum(values[:, 0], values[:, 1])
  high_b = jnp.maximum(values[:, 2], values[:, 3])
  low_b = jnp.minimum(values[:, 2], values[:, 3])
  return (jnp.maximum(high_a, high_b)
          + jnp.maximum(jnp.minimum(high_a, high_b), jnp.maximum(low_a, low_b)))


@jax.jit
def _row_benefits(scores: jax.Array, groups: jax.Array, blocks: jax.Array) -> jax.Array:
  """Kept score of every row in every block, with each block's current kept columns.

  scores: (Kp', Np) (rows past those ``groups`` names are ignored); groups: (G, M);
  blocks: (R, V). The kept columns of (block, group) are the 4 with the largest L1
  over the block's rows (column-L1 rule). Returns (R, Np).
  """
  grouped = scores[groups]  # (G, M, Np)
  column_l1 = grouped[:, :, blocks].sum(-1)  # (G, M, R)
  kept = _rank_top(column_l1, KEPT_COLUMNS, axis=1)
  # The p-th kept column of every (group, block), in increasing column order.
  order = jnp.cumsum(kept, axis=1) * kept  # 1..4 at kept columns, 0 elsewhere
  column = jnp.arange(grouped.shape[1])[None, :, None]
  kept_columns = jnp.stack([jnp.sum(jnp.where(order == p + 1, column, 0), axis=1)
                            for p in range(KEPT_COLUMNS)], axis=1)  # (G, 4, R)

  def one_block(columns):  # (G, 4)
    return _top2_of_4(jnp.take_along_axis(grouped, columns[:, :, None], axis=1)).sum(0)

  return jax.lax.map(one_block, kept_columns.transpose(2, 0, 1))


@jax.jit
def _block_kept(scores: jax.Array, groups: jax.Array, blocks: jax.Array) -> jax.Array:
  """Kept score (column-L1 rule) of every (group, block): (G, R) float32.

  The search's fast objective; the host sums the blocks in float64.
  """
  grouped = scores[groups][:, :, blocks]  # (G, M, R, V)
  kept = _rank_top(grouped.sum(-1), KEPT_COLUMNS, axis=1)
  first, second = _top_two(jnp.where(kept[..., None], grouped, -jnp.inf), axis=1)
  return (first + second).sum(-1)


def _zigzag_deal(order: np.ndarray, capacities: np.ndarray, real: int,
                 padded: int) -> np.ndarray:
  """Deal items (in ``order``) to parts in zig-zag order: 0..P-1, P-1..0, ..."""
  parts = len(capacities)
  labels = np.empty(real, np.intp)
  fill = np.zeros(parts, np.intp)
  sweep = np.concatenate([np.arange(parts), np.arange(parts)[::-1]])
  position = 0
  for item in order:
    while fill[sweep[position % len(sweep)]] >= capacities[sweep[position % len(sweep)]]:
      position += 1
    part = sweep[position % len(sweep)]
    labels[item] = part
    fill[part] += 1
    position += 1
  return _labels_to_slots(labels, capacities, real, padded)


def _zigzag_start(problem: _Problem) -> tuple[np.ndarray, np.ndarray]:
  """The paper's start: inputs and outputs dealt in zig-zag order of total score."""
  s = problem.scores
  kp, np_ = s.shape
  group_caps = np.full(problem.groups_count, problem.m)
  group_caps[-1] -= kp - problem.k
  groups = _zigzag_deal(np.argsort(-s[:problem.k].sum(1), kind="stable"), group_caps,
                        problem.k, kp)
  blocks = _zigzag_deal(np.argsort(-s[:, :problem.n].sum(0), kind="stable"),
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


def _cocluster_start(problem: _Problem, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
    channel_type = _balanced_assignment(channel_by_block @ kept_types(type_by_block).T,
                                        type_caps, channel_type if warm else None)
    type_by_row = np.eye(types_count)[channel_type].T @ s  # (M, N)
    type_by_block = type_by_row @ np.eye(blocks_count)[row_block]
    row_block = _balanced_assignment(type_by_row.T @ kept_types(type_by_block),
                                     block_caps, row_block if warm else None)
    type_by_block = type_by_row @ np.eye(blocks_count)[row_block]
    objective = float(np.sort(type_by_block, axis=0)[-KEPT_COLUMNS:].sum())
    if objective <= best * (1 + 1e-12):
      break
    best = objective
  # Within a type, channels go to groups in order of total score.
  slots = _labels_to_slots(channel_type, type_caps, k, problem.scores.shape[0],
                           order_key=s.sum(1))  # (M, G)
  groups = slots.T.copy()
  # Padding channels must sit in the last group; _labels_to_slots put them at the
  # end of the short types, which is the last group's row of slots.
  blocks = _labels_to_slots(row_block, block_caps, n, problem.scores.shape[1])
  return groups, blocks


def _input_slot_step(problem: _Problem, device_scores: jax.Array, groups: np.ndarray,
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
    costs = np.asarray(_slot_costs(device_scores, device_blocks,
                                   jnp.asarray(np.delete(members, slot, axis=1)),
                                   jnp.asarray(members[:, slot])), np.float64)
    inside = np.flatnonzero(groups[batch, slot] < problem.k)
    if len(inside) < 2:
      continue
    chosen, target = linear_sum_assignment(costs[np.ix_(inside, inside)], maximize=True)
    groups[batch[inside[target]], slot] = members[inside[chosen], slot]
  return groups


def _output_step(problem: _Problem, device_scores: jax.Array, groups: np.ndarray,
                 blocks: np.ndarray) -> np.ndarray:
  """Re-clusters rows: every row to the block where it keeps most, block sizes fixed.

  The blocks' kept columns are held fixed while rows move (a balanced Lloyd step).
  """
  benefit = np.asarray(_row_benefits(device_scores, jnp.asarray(groups), jnp.asarray(blocks)),
                       np.float64)
  capacities = problem.block_capacities()
  labels = _balanced_assignment(benefit[:, :problem.n].T, capacities,
                                _slots_to_labels(blocks, problem.n))
  return _labels_to_slots(labels, capacities, problem.n, problem.scores.shape[1])


def _output_slot_step(problem: _Problem, groups: np.ndarray, blocks: np.ndarray) -> np.ndarray:
  """The paper's output step: per slot, re-insert one row of every block by assignment.

  Exact under the column-L1 rule: per (row, group, 4-subset) the row's top-2 score is
  tabulated (``row_kept``, memory N x G x C(M,4)); a block's kept score is then a sum
  of table entries at the subset its column L1s choose.
  """
  blocks = blocks.copy()
  m = problem.m
  pairs, subset_pairs = _subset_tables(m)
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


class _Best:
  """The best grouping seen so far under the column-L1 search objective."""

  def __init__(self, device_scores: jax.Array, groups: np.ndarray, blocks: np.ndarray):
    self.device_scores = device_scores
    self.groups, self.blocks = groups, blocks
    self.kept = self.evaluate(groups, blocks)

  def evaluate(self, groups: np.ndarray, blocks: np.ndarray) -> float:
    kept = _block_kept(self.device_scores, jnp.asarray(groups), jnp.asarray(blocks))
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

  problem: _Problem
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


def _search(problem: _Problem, method: str, search_outputs: bool, seed: int,
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
# Public API


def _scores_matrix(kernel, scores, in_axes) -> np.ndarray:
  """Validated float32 scores (|kernel| when None) as the 2D (in, out) view."""
  shape = tuple(np.shape(kernel))
  if scores is None:
    values = np.abs(np.asarray(kernel, np.float32))
  else:
    values = np.asarray(scores, np.float32)
    if values.shape != shape:
      raise ValueError(f"scores must have the kernel's shape {shape}, got {values.shape}.")
  if not np.all(np.isfinite(values)):
    raise ValueError("scores (or |kernel|) contain NaN or infinite entries; importance scores "
                     "must be finite.")
  if np.any(values < 0):
    raise ValueError(f"scores contain negative entries (min {float(values.min()):.4g}); "
                     f"importance scores must be >= 0 (e.g. |W|).")
  if values.ndim == 2 and in_axes is None:
    return values
  return np.asarray(as_matrix(jnp.asarray(values), in_axes), np.float32)


def _check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")


def kept_score(scores, config: VNMConfig | str, *, permutation: Permutation | None = None,
               rule: str = "column_l1", in_axes=None) -> float:
  """Total score kept by V:N:M pruning of ``scores`` (after ``permutation``).

  Equal to ``(scores * vnm_mask(kernel, config, scores=scores, rule=rule,
  permutation=permutation)).sum()`` (in float64), computed on the host without
  building the mask.

  Args:
    scores: importance scores, (in_features, out_features) or nD with ``in_axes``;
      finite and >= 0 (e.g. ``|kernel|``).
    config: a VNMConfig or "V:N:M" string.
    permutation: orderings of the 2D view's inputs and outputs, or None.
    rule: "column_l1" or "exhaustive" (see :func:`vnm_jax.vnm_mask`).
    in_axes: contraction axes of an nD ``scores``.
  """
  config = VNMConfig.parse(config)
  _check_rule(rule)
  matrix = _scores_matrix(scores, scores, in_axes)
  validate_permutation(permutation, matrix.shape)
  problem = _make_problem(matrix, config)
  groups, blocks = problem.identity()
  groups, blocks = _apply_permutation(problem, groups, blocks, permutation)
  return problem.kept(groups, blocks, rule)


def _apply_permutation(problem: _Problem, groups, blocks, permutation):
  if permutation is None:
    return groups, blocks
  if permutation.inputs is not None:
    order = np.concatenate([np.asarray(permutation.inputs),
                            np.arange(problem.k, problem.scores.shape[0])])
    groups = order.reshape(groups.shape)
  if permutation.outputs is not None:
    order = np.concatenate([np.asarray(permutation.outputs),
                            np.arange(problem.n, problem.scores.shape[1])])
    blocks = order.reshape(blocks.shape)
  return groups, blocks


def unstructured_kept_score(scores, density: float) -> float:
  """Score kept by unstructured pruning at ``density``: the sum of the top round(density * size)."""
  if not 0 < density <= 1:
    raise ValueError(f"density must be in (0, 1], got {density!r}.")
  flat = np.asarray(scores, np.float64).ravel()
  count = int(round(density * flat.size))
  return float(np.sort(flat)[flat.size - count:].sum()) if count else 0.0


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
  _check_rule(rule)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if time_budget_s is not None and not (isinstance(time_budget_s, (int, float))
                                        and time_budget_s > 0):
    raise ValueError(f"time_budget_s must be a positive number of seconds or None, got "
                     f"{time_budget_s!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {seed!r}.")
  if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
    raise ValueError(f"tolerance must be a share of the gap in [0, 1), got {tolerance!r}.")
  started = time.monotonic()
  deadline = math.inf if time_budget_s is None else started + time_budget_s
  matrix = _scores_matrix(kernel, scores, in_axes)
  problem = _make_problem(matrix, config)
  groups, blocks = _search(problem, method, search_outputs, int(seed), deadline, tolerance)
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


# ----------------------------------------------------------------------------------
# Whole models


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


def _leaves_by_path(tree, is_leaf=None) -> dict[str, object]:
  from vnm_jax.trees import path_str  # trees imports masks and scores; import lazily

  if tree is None:
    return {}
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {_without_collection(path_str(path)): leaf for path, leaf in leaves}


def _without_collection(path: str) -> str:
  return path[len("params/"):] if path.startswith("params/") else path


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
  import re

  from tqdm.auto import tqdm

  from vnm_jax.trees import path_str, tree_configs

  config_tree = tree_configs(params, config, filter=filter, configs=configs)
  config_leaves = jax.tree_util.tree_leaves(
      config_tree, is_leaf=lambda x: x is None or isinstance(x, VNMConfig))
  param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  selected = [(path_str(path), leaf, cfg)
              for (path, leaf), cfg in zip(param_leaves, config_leaves) if cfg is not None]
  given_scores = _leaves_by_path(scores)
  axes_patterns = [(re.compile(pattern), axes) for pattern, axes in (in_axes or {}).items()]
  permutations, reports = {}, []
  bar = tqdm(selected, desc="permutations", disable=not progress)
  for path, leaf, cfg in bar:
    bar.set_postfix_str(path)
    axes = None
    if len(leaf.shape) > 2:
      axes = next((a for pattern, a in axes_patterns if pattern.search(path)), None)
      if axes is None:
        raise ValueError(f"{path!r} has shape {tuple(leaf.shape)}: a kernel with more than 2 "
                         f"dims needs its contraction axes in in_axes, e.g. "
                         f"in_axes={{{path!r}: (0,)}}.")
    leaf_scores = given_scores.get(_without_collection(path))
    matrix = _scores_matrix(leaf, leaf_scores, axes)
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


# ----------------------------------------------------------------------------------
# Folding an output permutation into the next layer


class FoldedPair(NamedTuple):
  """A producer/consumer pair with the producer's output order folded into both.

  Attributes:
    producer: ``producer[:, outputs]``: its natural output order is now the order
      the search grouped, so it prunes and compresses with ``producer_permutation``
      and needs no output un-permute.
    consumer: the consumer with its input rows reordered to match.
    producer_permutation: ``Permutation(permutation.inputs, None)``.
    consumer_permutation: the consumer's own permutation (if one was given) in the
      new row order.
    producer_bias: ``bias[outputs]`` or None.
    siblings: the sibling kernels (e.g. a SwiGLU gate) with their outputs reordered alike.
  """

  producer: jax.Array
  consumer: jax.Array
  producer_permutation: Permutation
  consumer_permutation: Permutation | None
  producer_bias: jax.Array | None
  siblings: tuple[jax.Array, ...]


def fold_output_permutation(producer, consumer, permutation: Permutation, *,
                            producer_bias=None, siblings=(),
                            consumer_permutation: Permutation | None = None,
                            head_dim: int | None = None, query_groups: int = 1) -> FoldedPair:
  """Moves a producer's output permutation into the consumer's input rows.

  For a pair ``y = consumer_fn(f(x @ producer + bias))`` in which the producer's
  output features reach the consumer's input rows one to one through per-feature
  operations only (activations, a bias, the SwiGLU product, attention's token mixing
  within a head), reordering those features in both kernels leaves the function
  unchanged. After the fold, the producer's V:N:M mask with
  ``producer_permutation`` equals the original mask with ``permutation`` with its
  columns reordered, and ``compress`` stores no ``output_index``.

  - MLP (up -> down): pass the up kernel and the down kernel; a bias of the up layer
    as ``producer_bias``.
  - SwiGLU ``down(silu(gate(x)) * up(x))``: the gate and up outputs are multiplied
    feature by feature, so both must use the same output order for the fold to be
    valid: search one of them (e.g. up), give the other as a sibling here, and prune
    the sibling with ``Permutation(its own inputs, None)`` on its folded kernel (find
    its input order with ``find_permutation(folded_gate, cfg, search_outputs=False)``).
  - Attention (v -> o): attention weights are per head, so the fold is valid only
    when ``permutation.outputs`` keeps every head's features inside that head; give
    ``head_dim`` to have it checked. With grouped-query attention (each key/value
    head serves ``query_groups`` query heads), o's input rows of every query head in
    a group are reordered like their key/value head.

  Args:
    producer: (K, N) kernel whose outputs were permuted.
    consumer: (N * query_groups, P) kernel reading those outputs.
    permutation: the producer's Permutation (its ``outputs`` is folded).
    producer_bias: (N,) bias of the producer, or None.
    siblings: (K', N) kernels whose outputs meet the producer's feature by feature.
    consumer_permutation: the consumer's own Permutation (found on the unfolded
      consumer), returned in the folded row order.
    head_dim: features per attention head, to check the permutation keeps heads.
    query_groups: query heads per key/value head (grouped-query attention).

  Returns:
    A :class:`FoldedPair`.
  """
  producer = jnp.asarray(producer)
  consumer = jnp.asarray(consumer)
  if producer.ndim != 2 or consumer.ndim != 2:
    raise ValueError(f"producer and consumer must be 2D (in, out) kernels, got shapes "
                     f"{producer.shape} and {consumer.shape}.")
  validate_permutation(permutation, producer.shape)
  if permutation is None:
    raise ValueError("permutation is None: there is no output permutation to fold.")
  n = producer.shape[1]
  if isinstance(query_groups, bool) or not isinstance(query_groups, int) or query_groups < 1:
    raise ValueError(f"query_groups must be a positive int, got {query_groups!r}.")
  if consumer.shape[0] != n * query_groups:
    raise ValueError(f"consumer must have {n * query_groups} input rows (producer outputs {n} "
                     f"x query_groups {query_groups}), got shape {consumer.shape}.")
  outputs = (np.arange(n) if permutation.outputs is None
             else np.asarray(permutation.outputs, np.intp))
  if head_dim is not None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1 \
        or n % head_dim:
      raise ValueError(f"head_dim must be a positive int dividing the producer's {n} outputs, "
                       f"got {head_dim!r}.")
    moved = np.flatnonzero(outputs // head_dim != np.arange(n) // head_dim)
    if len(moved):
      raise ValueError(f"permutation.outputs moves features across attention heads (e.g. "
                       f"position {moved[0]} takes feature {outputs[moved[0]]} with head_dim "
                       f"{head_dim}); attention weights are per head, so the fold would change "
                       f"the function. Search with search_outputs=False or keep heads intact.")
  elif query_groups > 1:
    raise ValueError("query_groups > 1 needs head_dim (features per head) to map key/value "
                     "features to query heads.")
  if query_groups > 1:
    heads = n // head_dim
    within = (outputs % head_dim).reshape(heads, head_dim)  # per kv head, new -> old
    query_rows = np.arange(heads * query_groups)[:, None] * head_dim
    consumer_order = (query_rows + within.repeat(query_groups, axis=0)).ravel()
  else:
    consumer_order = outputs
  if producer_bias is not None:
    producer_bias = jnp.asarray(producer_bias)
    if producer_bias.shape != (n,):
      raise ValueError(f"producer_bias must have shape ({n},), got {producer_bias.shape}.")
    producer_bias = producer_bias[outputs]
  folded_siblings = []
  for index, sibling in enumerate(siblings):
    sibling = jnp.asarray(sibling)
    if sibling.ndim != 2 or sibling.shape[1] != n:
      raise ValueError(f"siblings[{index}] must be a 2D kernel with {n} outputs, got shape "
                       f"{sibling.shape}.")
    folded_siblings.append(sibling[:, outputs])
  if consumer_permutation is not None:
    validate_permutation(consumer_permutation, consumer.shape)
    if consumer_permutation.inputs is not None:
      new_position = np.argsort(consumer_order)
      consumer_permutation = Permutation(
          new_position[np.asarray(consumer_permutation.inputs)].astype(np.int32),
          consumer_permutation.outputs)
  return FoldedPair(producer=producer[:, outputs], consumer=consumer[consumer_order],
                    producer_permutation=Permutation(permutation.inputs, None),
                    consumer_permutation=consumer_permutation, producer_bias=producer_bias,
                    siblings=tuple(folded_siblings))
