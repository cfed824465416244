"""The objective of the permutation search: the score V:N:M pruning keeps.

A grouping is ``groups`` (G, M), the input channels of every M group, and ``blocks``
(R, V), the output rows of every V block, over scores padded with zeros to (Kp, Np)
(:class:`Problem`). The kept score is computed exactly on the host in float64
(:func:`grouping_kept`, for the final comparison and :func:`kept_score`) and, for the
search's inner loops, by jitted functions under the column-L1 rule
(:func:`slot_costs`, :func:`row_benefits`, :func:`group_block_kept`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import (as_array, as_matrix, check_kernel_shape, check_rule, check_scores,
                           top2_sum_of_4)
from vnm_jax.permutation import Permutation, validate_permutation

# Elements of one chunk of the cost computations (bounds memory).
COST_CHUNK_ELEMENTS = 1 << 26

# ----------------------------------------------------------------------------------
# Kept score of a grouping (exact, float64, numpy)


def _top2_sum(values: np.ndarray, axis: int) -> np.ndarray:
  """Sum of the 2 largest entries along ``axis`` (size >= 2)."""
  part = -np.partition(-values, 1, axis=axis)
  return np.take(part, 0, axis=axis) + np.take(part, 1, axis=axis)


@functools.lru_cache(maxsize=None)
def subset_tables(m: int) -> tuple[np.ndarray, np.ndarray]:
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
  pairs, subset_pairs = subset_tables(m)
  pair_sums = blocks[..., pairs[:, 0], :] + blocks[..., pairs[:, 1], :]  # (..., P, V)
  best = np.full(blocks.shape[:-2], -np.inf)
  for pair_ids in subset_pairs:  # C(M,4) subsets, each kept row keeps its best of 6 pairs
    best = np.maximum(best, pair_sums[..., pair_ids, :].max(-2).sum(-1, dtype=np.float64))
  return best


def grouping_kept(scores: np.ndarray, groups: np.ndarray, blocks: np.ndarray,
                  rule: str) -> float:
  """Kept score of padded scores (Kp, Np) grouped as groups (G, M) x blocks (R, V)."""
  grouped = scores[groups]  # (G, M, Np)
  pairs = math.comb(groups.shape[1], 2) if rule == "exhaustive" else 1
  per_chunk = max(1, COST_CHUNK_ELEMENTS // (8 * grouped.shape[0] * grouped.shape[1]
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
class Problem:
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
    return grouping_kept(self.scores, groups, blocks, rule)

  def type_capacities(self) -> np.ndarray:
    """Real channels per slot when every group holds one per slot (padding fills the last)."""
    padding = self.scores.shape[0] - self.k
    return np.array([self.groups_count - (s >= self.m - padding) for s in range(self.m)])

  def block_capacities(self) -> np.ndarray:
    capacities = np.full(self.blocks_count, self.v)
    capacities[-1] -= self.scores.shape[1] - self.n
    return capacities


def make_problem(scores: np.ndarray, config: VNMConfig) -> Problem:
  k, n = scores.shape
  kp, np_ = -(-k // config.m) * config.m, -(-n // config.v) * config.v
  padded = np.zeros((kp, np_), np.float32)
  padded[:k, :n] = scores
  return Problem(padded, k, n, config.v, config.m)


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
def slot_costs(scores: jax.Array, blocks: jax.Array, others: jax.Array,
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
  chunk = max(1, min(count, COST_CHUNK_ELEMENTS // max(1, top2.size)))
  if chunk == count:  # one chunk: no loop (compiles faster)
    return chunk_costs((inserted_values, inserted_l1))
  padded = -(-count // chunk) * chunk
  pad = ((0, padded - count),)
  chunks = (jnp.pad(inserted_values, pad + ((0, 0), (0, 0))).reshape(
                -1, chunk, *inserted_values.shape[1:]),
            jnp.pad(inserted_l1, pad + ((0, 0),)).reshape(-1, chunk, inserted_l1.shape[1]))
  return jax.lax.map(chunk_costs, chunks).reshape(padded, -1)[:count]


@jax.jit
def row_benefits(scores: jax.Array, groups: jax.Array, blocks: jax.Array) -> jax.Array:
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
    kept = jnp.take_along_axis(grouped, columns[:, :, None], axis=1)  # (G, 4, Np)
    return top2_sum_of_4(*(kept[:, p] for p in range(KEPT_COLUMNS))).sum(0)

  return jax.lax.map(one_block, kept_columns.transpose(2, 0, 1))


@jax.jit
def group_block_kept(scores: jax.Array, groups: jax.Array, blocks: jax.Array) -> jax.Array:
  """Kept score (column-L1 rule) of every (group, block): (G, R) float32.

  The search's fast objective; the host sums the blocks in float64.
  """
  grouped = scores[groups][:, :, blocks]  # (G, M, R, V)
  kept = _rank_top(grouped.sum(-1), KEPT_COLUMNS, axis=1)
  first, second = _top_two(jnp.where(kept[..., None], grouped, -jnp.inf), axis=1)
  return (first + second).sum(-1)


# ----------------------------------------------------------------------------------
# Kept score of a kernel


def scores_matrix(kernel, scores, in_axes) -> np.ndarray:
  """Validated scores (|kernel| when None, as in vnm_mask): the 2D (in, out) view, float32."""
  kernel = as_array(kernel)
  check_kernel_shape(kernel.shape, ndim=None)
  checked = check_scores(jnp.abs(kernel) if scores is None else scores, kernel.shape)
  return np.asarray(as_matrix(checked, in_axes), np.float32)


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
  check_rule(rule)
  matrix = scores_matrix(scores, scores, in_axes)
  validate_permutation(permutation, matrix.shape)
  problem = make_problem(matrix, config)
  groups, blocks = problem.identity()
  groups, blocks = _apply_permutation(problem, groups, blocks, permutation)
  return problem.kept(groups, blocks, rule)


def _apply_permutation(problem: Problem, groups, blocks, permutation):
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
  if isinstance(density, bool) or not isinstance(density, (int, float, np.floating)) \
      or not 0 < density <= 1:
    raise ValueError(f"density must be in (0, 1] (a number), got {density!r}.")
  flat = np.asarray(check_scores(scores, np.shape(scores)), np.float64).ravel()
  if flat.size == 0:
    raise ValueError(f"scores has a zero-size dimension: shape {np.shape(scores)}.")
  count = int(round(density * flat.size))
  return float(np.sort(flat)[flat.size - count:].sum()) if count else 0.0

