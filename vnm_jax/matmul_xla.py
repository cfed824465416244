"""The XLA implementation of the V:N:M matmul: the reference and the fallback that always works.

Works on the raw arrays of :class:`vnm_jax.format.VNMWeight` (see that module for the
layout): ``values`` (R, 2, G, V), ``meta`` (R, G, H) uint8, ``columns`` (R, 4, G)
int32, and x zero-padded to G*M features. The result is ``y_blocks`` (T, R*V): the
outputs in row-block order, before the output permutation is undone.

Formulation (the fastest of those measured on CPU; bench/RESULTS.md): a ``lax.map``
over chunks of 2 row blocks; for each block, gather the 4*G kept input features of
x (x transposed, so each gathered feature is one contiguous row of tokens), expand
the block's condensed weight (4*G, V) from its 2 stored values per row and group
and their 2-bit positions (:func:`vnm_jax.ops.vnm_matmul.layout.condense`), and run one
dense dot. Executed multiply-adds are 4/M of dense. A chunk is small enough that
its gathered x and expanded weight stay in cache. Gathering columns of the
untransposed x measured 1.8x slower; stacking 4 per-slot selects to expand the
weight, 3-4x slower than :func:`~vnm_jax.ops.vnm_matmul.layout.condense`'s one broadcast
select. Blocks per step (1-8) and condensing all blocks up front moved the time by
less than the run-to-run noise of the shared CPU these were measured on;
``bench/kernel.py --tune-xla`` re-measures the former.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS, condense, positions

# Row blocks per lax.map step on CPU (tuned in bench/kernel.py --tune-xla).
DEFAULT_BLOCKS_PER_STEP = 2


def _contract_first(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """a (K, A), b (K, B) -> a.T @ b (A, B), accumulated in float32 and cast to dtype."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(dtype)


def matmul_blocks(x_pad: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array, *,
                  blocks_per_step: int = DEFAULT_BLOCKS_PER_STEP) -> jax.Array:
  """``y_blocks = x_pad @ W`` for W in the compressed layout.

  Args:
    x_pad: (T, G*M) x zero-padded to G*M features.
    values: (R, 2, G, V); meta: (R, G, H) uint8; columns: (R, 4, G) int32.
    blocks_per_step: row blocks per ``lax.map`` step.

  Returns:
    (T, R*V) in x_pad's dtype (float32 accumulation).
  """
  row_blocks, _, groups, v = values.shape
  xt = x_pad.T  # (Kp, T): a gathered input feature is a contiguous row.
  values = values.astype(x_pad.dtype)

  def one_block(block):
    block_values, block_meta, block_columns = block
    weight = condense(block_values, block_meta).reshape(KEPT_COLUMNS * groups, v)
    gathered = xt.at[block_columns.reshape(-1)].get(mode="promise_in_bounds")  # (4G, T)
    return _contract_first(weight, gathered, x_pad.dtype)  # (V, T)

  y = lax.map(one_block, (values, meta, columns), batch_size=min(blocks_per_step, row_blocks))
  return y.reshape(row_blocks * v, -1).T


def _chunks(tree, size: int):
  """Splits the leading (row-block) axis into (ceil(R/size), size), padding with zeros."""
  def split(a):
    pad = -a.shape[0] % size
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(-1, size, *a.shape[1:])
  return jax.tree.map(split, tree)


def matmul_blocks_vjp(x_pad: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array,
                      dy: jax.Array, *, blocks_per_step: int = DEFAULT_BLOCKS_PER_STEP
                      ) -> tuple[jax.Array, jax.Array]:
  """Cotangents of :func:`matmul_blocks` for x_pad and values.

  Args:
    x_pad, values, meta, columns: as for :func:`matmul_blocks`.
    dy: (T, R*V) cotangent of y_blocks.

  Returns:
    (dx_pad (T, G*M) in x_pad's dtype, dvalues (R, 2, G, V) in values' dtype). Per
    row block, the condensed weight's gradient is gathered x^T @ dy, read at the
    stored positions; x's gradient is dy @ condensed^T, added back into the gathered
    input features (a scan carries it, so no (R, 4G, T) intermediate is built).
  """
  row_blocks, _, groups, v = values.shape
  xt = x_pad.T
  dyt = dy.astype(x_pad.dtype).T.reshape(row_blocks, v, -1)  # (R, V, T)

  def one_block(block_values, block_meta, block_columns, block_dyt):
    gathered = xt.at[block_columns.reshape(-1)].get(mode="promise_in_bounds")  # (4G, T)
    weight_grad = lax.dot_general(gathered, block_dyt, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    weight_grad = weight_grad.reshape(KEPT_COLUMNS, groups, v)
    pos = positions(block_meta, v)
    pos0, pos1 = pos[0], pos[1]
    value_grad = jnp.stack([jnp.take_along_axis(weight_grad, pos[None], axis=0)[0]
                            for pos in (pos0, pos1)])  # (2, G, V)
    weight = condense(block_values, block_meta).reshape(KEPT_COLUMNS * groups, v)
    gathered_grad = lax.dot_general(weight, block_dyt, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)  # (4G, T)
    return value_grad, gathered_grad

  def step(dxt, chunk):
    chunk_columns = chunk[2]
    value_grad, gathered_grad = jax.vmap(one_block)(*chunk)
    dxt = dxt.at[chunk_columns.reshape(-1)].add(
        gathered_grad.reshape(-1, gathered_grad.shape[-1]), mode="promise_in_bounds")
    return dxt, value_grad

  chunk_size = min(blocks_per_step, row_blocks)
  chunks = _chunks((values.astype(x_pad.dtype), meta, columns, dyt), chunk_size)
  dxt, value_grads = lax.scan(step, jnp.zeros(xt.shape, jnp.float32), chunks)
  value_grads = value_grads.reshape(-1, *value_grads.shape[2:])[:row_blocks]
  return dxt.T.astype(x_pad.dtype), value_grads.astype(values.dtype)
