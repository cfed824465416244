"""V:N:M masks of Flax kernels: which entries a pruned weight keeps.

Axis convention: a Flax kernel is (in_features, out_features). M groups run along
axis 0 (the reduction axis of ``x @ kernel``), V blocks along axis 1. A block of V
outputs x M inputs keeps 4 whole input columns, then 2 of those 4 entries per row.

Besides the masks, this module is the one home of what every mask computation checks
and shares: :func:`check_kernel_shape` (2D or at least 2 dims, no zero-size one),
:func:`as_array`, :func:`check_rule`, :func:`check_scores` and :func:`top2_sum_of_4`
(also used by the scores, the trees, the permutation search and the training transforms).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.permutation import Permutation, permute, unpermute, validate_permutation

Rule = Literal["column_l1", "exhaustive"]
RULES = ("column_l1", "exhaustive")

# Padding score: real scores are >= 0, so a padded entry is never preferred.
_PAD_SCORE = -1.0


def check_kernel_shape(shape, name: str = "kernel", ndim: int | None = 2) -> tuple[int, ...]:
  """``shape`` as ints if V:N:M can cut it: ``ndim`` dims (None: at least 2), none of size 0.

  Raises:
    ValueError: naming ``name`` and the shape.
  """
  shape = tuple(int(d) for d in shape)
  if ndim is not None and len(shape) != ndim:
    raise ValueError(f"{name} must be {ndim}D (in_features, out_features), got shape "
                     f"{shape}; view an nD kernel with vnm_jax.as_matrix(kernel, in_axes).")
  if len(shape) < 2:
    raise ValueError(f"{name} must have at least 2 dims (in, out), got shape {shape}.")
  if min(shape) < 1:
    raise ValueError(f"{name} has a zero-size dimension: shape {shape}; V:N:M needs every "
                     f"dimension >= 1.")
  return shape


def as_array(x, name: str = "kernel") -> jax.Array:
  """``jnp.asarray(x)`` of a numeric (int or floating, not bool) array; else a TypeError
  naming ``name``."""
  try:
    array = jnp.asarray(x)
  except TypeError:
    raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} "
                    f"{str(x)[:40]!r}.") from None
  if not (jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating)):
    raise TypeError(f"{name} must be a numeric array (int or floating), got dtype "
                    f"{array.dtype}.")
  return array


def _normalize_in_axes(ndim: int, in_axes: Sequence[int] | int | None) -> tuple[int, ...]:
  if in_axes is None:
    if ndim == 2:
      return (0,)
    raise ValueError(f"in_axes is required for a kernel with {ndim} dims: name its "
                     f"contraction (input) axes, e.g. in_axes=(0,) for DenseGeneral "
                     f"(in, heads, head_dim) or in_axes=(0, 1) for (heads, head_dim, out).")
  axes = (in_axes,) if isinstance(in_axes, (int, np.integer, str)) else tuple(in_axes)
  normalized = []
  for axis in axes:
    if (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))
        or not -ndim <= axis < ndim):
      raise ValueError(f"in_axes entry {axis!r} is not an axis of a {ndim}-dim kernel "
                       f"(allowed: {-ndim}..{ndim - 1}).")
    normalized.append(int(axis) % ndim)
  if len(set(normalized)) != len(normalized) or not normalized or len(normalized) == ndim:
    raise ValueError(f"in_axes={in_axes!r} must name distinct axes, at least one and not all "
                     f"{ndim} of them.")
  return tuple(sorted(normalized))


def as_matrix(x: jax.Array, in_axes: Sequence[int] | int | None = None) -> jax.Array:
  """The 2D (in, out) view of a kernel: ``in_axes`` first and flattened, the rest flattened.

  A 2D kernel needs no ``in_axes`` (it is (in, out)); one with more dims must name
  its contraction axes. A zero-size dimension is a ValueError.
  """
  x = jnp.asarray(x)
  check_kernel_shape(x.shape, ndim=None)
  axes = _normalize_in_axes(x.ndim, in_axes)
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  moved = jnp.transpose(x, axes + rest)
  fan_in = math.prod(x.shape[a] for a in axes)
  return moved.reshape(fan_in, -1)


def from_matrix(matrix: jax.Array, shape: Sequence[int],
                in_axes: Sequence[int] | int | None = None) -> jax.Array:
  """Inverse of :func:`as_matrix`: back to the kernel's original ``shape``."""
  shape = check_kernel_shape(shape, "shape", ndim=None)
  axes = _normalize_in_axes(len(shape), in_axes)
  rest = tuple(a for a in range(len(shape)) if a not in axes)
  order = axes + rest
  expected = (math.prod(shape[a] for a in axes), math.prod(shape[a] for a in rest))
  if tuple(jnp.shape(matrix)) != expected:
    raise ValueError(f"matrix must have the (in, out) view shape {expected} of a kernel of "
                     f"shape {shape} with in_axes={in_axes!r}, got {tuple(jnp.shape(matrix))}.")
  moved = matrix.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(moved, np.argsort(order))


def check_scores(scores, shape: tuple[int, ...], name: str = "scores") -> jax.Array:
  """Importance scores of ``shape`` as a floating array; finite and >= 0 outside jit.

  Raises:
    TypeError: not a numeric array (bool included).
    ValueError: another shape, or (on concrete values) NaN, infinite or negative entries.
  """
  scores = as_array(scores, name)
  if scores.shape != tuple(shape):
    raise ValueError(f"{name} must have the kernel's shape {tuple(shape)}, got {scores.shape}.")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  if not isinstance(scores, jax.core.Tracer):
    # Host check; under jit the values are unknown and the mask stays V:N:M anyway.
    values = np.asarray(scores)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(values)))} NaN or infinite "
                       f"entries; importance scores must be finite.")
    if np.any(values < 0):
      raise ValueError(f"{name} contains negative entries (min {float(values.min()):.4g}); "
                       f"importance scores must be >= 0 (e.g. |W|).")
  return scores


def _check_config(config) -> VNMConfig:
  return VNMConfig.parse(config)


def check_rule(rule: str) -> None:
  """Raises a ValueError naming :data:`RULES` unless ``rule`` is one of them."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")


def _padded_blocks(scores: jax.Array, config: VNMConfig) -> jax.Array:
  """(K, N) scores -> (G, R, V, M): group g, row block r, row v, column within group."""
  k, n = scores.shape
  kp = -(-k // config.m) * config.m
  np_ = -(-n // config.v) * config.v
  padded = jnp.pad(scores.astype(jnp.float32), ((0, kp - k), (0, np_ - n)),
                   constant_values=_PAD_SCORE)
  g, r = kp // config.m, np_ // config.v
  return padded.reshape(g, config.m, r, config.v).transpose(0, 2, 3, 1)


def _unblock(mask_blocks: jax.Array, shape: tuple[int, int]) -> jax.Array:
  g, r, v, m = mask_blocks.shape
  return mask_blocks.transpose(0, 3, 1, 2).reshape(g * m, r * v)[:shape[0], :shape[1]]


def _top2_in_columns(blocks: jax.Array, kept_columns: jax.Array) -> jax.Array:
  """Per row, the 2 highest scores among the block's kept columns.

  blocks: (G, R, V, M) scores; kept_columns: (G, R, M) bool with 4 True per block.
  Returns (G, R, V, M) bool. Two argmax passes beat a sort for M this small; ties go
  to the lower column index.
  """
  m = blocks.shape[-1]
  candidates = jnp.where(kept_columns[:, :, None, :], blocks, -jnp.inf)
  first = jnp.argmax(candidates, axis=-1)
  columns = jnp.arange(m)
  is_first = columns == first[..., None]
  second = jnp.argmax(jnp.where(is_first, -jnp.inf, candidates), axis=-1)
  return is_first | (columns == second[..., None])


def _column_l1_columns(blocks: jax.Array) -> jax.Array:
  """The 4 columns of each block with the largest L1 of scores over its V rows."""
  column_l1 = blocks.sum(axis=2)  # (G, R, M)
  _, top = jax.lax.top_k(column_l1, KEPT_COLUMNS)
  return jax.nn.one_hot(top, blocks.shape[-1], dtype=jnp.bool_).any(axis=-2)


@functools.lru_cache(maxsize=None)
def _subsets(m: int) -> np.ndarray:
  """The C(M,4) column subsets of a group, (S, 4), in lexicographic order."""
  return np.array(list(itertools.combinations(range(m), KEPT_COLUMNS)), np.int32)


def top2_sum_of_4(a, b, c, d):
  """Elementwise sum of the 2 largest of 4 arrays (a comparison network, no sort).

  What one row of a block keeps from its 4 kept columns after the 2:4 step.
  """
  high1, low1 = jnp.maximum(a, b), jnp.minimum(a, b)
  high2, low2 = jnp.maximum(c, d), jnp.minimum(c, d)
  return (jnp.maximum(high1, high2)
          + jnp.maximum(jnp.minimum(high1, high2), jnp.maximum(low1, low2)))


# Blocks per step of the exhaustive search: a chunk's scores stay in cache while all
# C(M,4) subsets are scored (measured fastest among 8..256 on a 4096 x 11008 kernel).
_EXHAUSTIVE_CHUNK = 16


def _exhaustive_columns(blocks: jax.Array) -> jax.Array:
  """The 4 columns per block that keep the most score after the 2:4 step (VENOM's rule).

  Blocks are visited in chunks; for each chunk a scan over the C(M,4) subsets keeps
  the best so far, so memory is O(blocks) and compile time does not grow with C(M,4).
  Ties go to the first subset in lexicographic order.
  """
  g, r, v, m = blocks.shape
  count = g * r
  steps = -(-count // _EXHAUSTIVE_CHUNK)
  flat = jnp.pad(blocks.reshape(count, v, m),
                 ((0, steps * _EXHAUSTIVE_CHUNK - count), (0, 0), (0, 0)))
  # (steps, M, chunk, V): picking a column is then a contiguous dynamic slice.
  chunks = flat.reshape(steps, _EXHAUSTIVE_CHUNK, v, m).transpose(0, 3, 1, 2)
  subsets = jnp.asarray(_subsets(m))

  def best_in_chunk(chunk):
    def step(carry, subset):
      best_value, best_subset, index = carry
      columns = [jax.lax.dynamic_index_in_dim(chunk, subset[i], 0, keepdims=False)
                 for i in range(KEPT_COLUMNS)]
      kept = top2_sum_of_4(*columns).sum(axis=-1)
      better = kept > best_value
      return (jnp.where(better, kept, best_value), jnp.where(better, index, best_subset),
              index + 1), None

    init = (jnp.full(_EXHAUSTIVE_CHUNK, -jnp.inf), jnp.zeros(_EXHAUSTIVE_CHUNK, jnp.int32),
            jnp.int32(0))
    (_, best, _), _ = jax.lax.scan(step, init, subsets)
    return best

  best_subset = jax.lax.map(best_in_chunk, chunks).reshape(-1)[:count].reshape(g, r)
  return jax.nn.one_hot(subsets[best_subset], m, dtype=jnp.bool_).any(axis=-2)


@functools.partial(jax.jit, static_argnames=("config", "rule"))
def _vnm_mask_2d(scores: jax.Array, config: VNMConfig, rule: str) -> jax.Array:
  blocks = _padded_blocks(scores, config)
  if config.is_2to4:
    kept_columns = jnp.ones(blocks.shape[:2] + (config.m,), jnp.bool_)
  elif rule == "column_l1":
    kept_columns = _column_l1_columns(blocks)
  else:
    kept_columns = _exhaustive_columns(blocks)
  return _unblock(_top2_in_columns(blocks, kept_columns), scores.shape)


def _mask_keeping_sharding(scores: jax.Array, config: VNMConfig, rule: str) -> jax.Array:
  """``_vnm_mask_2d``, also for scores sharded over Explicit mesh axes.

  The block reshapes have no rule for explicitly sharded operands, so under Explicit
  axes the mask is computed with the axes made Auto and returned sharded like scores.
  """
  sharding = jax.typeof(scores).sharding
  if (isinstance(sharding, jax.sharding.NamedSharding) and not sharding.mesh.empty
      and any(spec is not None for spec in sharding.spec)):
    return jax.sharding.auto_axes(lambda s: _vnm_mask_2d(s, config, rule),
                                  out_sharding=sharding)(scores)
  return _vnm_mask_2d(scores, config, rule)


def vnm_mask(kernel: jax.Array, config: VNMConfig | str, *, scores: jax.Array | None = None,
             rule: Rule = "column_l1", in_axes: Sequence[int] | int | None = None,
             permutation: Permutation | None = None) -> jax.Array:
  """The V:N:M mask of a Flax kernel.

  Args:
    kernel: (in_features, out_features), or nD with ``in_axes`` naming the
      contraction axes (the kernel is then viewed as a 2D (in, out) matrix).
    config: a VNMConfig or a string such as "64:2:8".
    scores: importance of each entry, kernel's shape, finite and >= 0; default |kernel|.
    rule: "column_l1" (the paper's: per block, the 4 columns with the largest L1 of
      scores over the V rows) or "exhaustive" (VENOM's: the best of all C(M,4)
      subsets after the 2:4 step). Either way each row then keeps its 2 largest
      scores among the 4 columns.
    in_axes: contraction axes for kernels with more than 2 dims.
    permutation: if given, groups are formed on ``kernel[inputs][:, outputs]`` (of
      the 2D view); the mask is returned in original coordinates.

  Returns:
    A bool array of kernel's shape: True where the entry is kept. Dimensions that do
    not divide by M or V are padded with entries that are never preferred, then
    cropped. Jittable; ``config``, ``rule`` and ``in_axes`` must be static.
  """
  config = _check_config(config)
  check_rule(rule)
  kernel = as_array(kernel)
  check_kernel_shape(kernel.shape, ndim=None)
  matrix_scores = as_matrix(check_scores(jnp.abs(kernel) if scores is None else scores,
                                         kernel.shape), in_axes)
  validate_permutation(permutation, matrix_scores.shape)
  mask = _mask_keeping_sharding(permute(matrix_scores, permutation), config, rule)
  return from_matrix(unpermute(mask, permutation), kernel.shape, in_axes)


def is_vnm(mask, config: VNMConfig | str, *, in_axes: Sequence[int] | int | None = None,
           permutation: Permutation | None = None) -> bool:
  """Whether a mask (or a pruned weight's non-zeros) follows the V:N:M structure.

  True when, on the (permuted) 2D view, every V x M block uses at most 4 distinct
  input columns and every row of a block has at most 2 non-zeros. A sparser mask
  passes: it still compresses. Host-side (numpy); a 2D mask that is already in the
  permuted order (``permutation=None``) is checked without a trip through the device.
  """
  config = _check_config(config)
  check_kernel_shape(np.shape(mask), "mask", ndim=None)
  if in_axes is None and permutation is None and np.ndim(mask) == 2:
    matrix = np.asarray(mask) != 0
  else:
    matrix = as_matrix(jnp.asarray(mask) != 0, in_axes)
    validate_permutation(permutation, matrix.shape)
    matrix = np.asarray(permute(matrix, permutation))
  k, n = matrix.shape
  kp = -(-k // config.m) * config.m
  np_ = -(-n // config.v) * config.v
  padded = np.zeros((kp, np_), bool)
  padded[:k, :n] = matrix
  blocks = padded.reshape(kp // config.m, config.m, np_ // config.v, config.v)
  rows_ok = blocks.sum(axis=1).max(initial=0) <= config.n
  columns_ok = blocks.any(axis=3).sum(axis=1).max(initial=0) <= KEPT_COLUMNS
  return bool(rows_ok and columns_ok)


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
  """Plain N:M mask: the n largest of every m consecutive entries along ``axis``.

  For a Flax kernel (in, out) the default axis 0 groups along the inputs, the
  axis sparse tensor cores contract. A length that does not divide by m is padded
  with entries never preferred, then cropped. Ties go to the lower index.
  """
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n, m)) \
      or not 1 <= n <= m:
    raise ValueError(f"nm_mask needs integers 1 <= n <= m, got n={n!r}, m={m!r}.")
  scores = as_array(scores, "scores")
  if isinstance(axis, bool) or not isinstance(axis, int) or not -scores.ndim <= axis < scores.ndim:
    raise ValueError(f"axis={axis!r} is not an axis of scores with shape {scores.shape}.")
  if scores.size == 0:
    raise ValueError(f"scores has a zero-size dimension: shape {scores.shape}.")
  scores = check_scores(scores, scores.shape)
  moved = jnp.moveaxis(scores, axis, -1).astype(jnp.float32)
  length = moved.shape[-1]
  padded_length = -(-length // m) * m
  padded = jnp.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, padded_length - length)],
                   constant_values=_PAD_SCORE)
  groups = padded.reshape(*moved.shape[:-1], padded_length // m, m)
  _, top = jax.lax.top_k(groups, n)
  mask = jax.nn.one_hot(top, m, dtype=jnp.bool_).any(axis=-2)
  mask = mask.reshape(*moved.shape[:-1], padded_length)[..., :length]
  return jnp.moveaxis(mask, -1, axis)
