"""The XLA implementation of the V:N:M matmul: the reference and the fallback that always works.

Raw arrays only (layout: :mod:`vnm_jax.ops.vnm_matmul.layout`). Every function takes x
zero-padded to G*M features and returns ``y_blocks`` (T, R*V), the outputs in row-block
order. Executed multiply-adds are 4/M of dense: each row block gathers its 4*G kept
input features of x and runs one dense dot against its condensed weight.

Three formulations of the forward on the *prepared* condensed weight (R, 4G, V),
chosen by token count from measurements (:mod:`vnm_jax.ops.vnm_matmul.dispatch`):

- :func:`matmul_batched`: one gather of x (R, 4G, T) and one batched dot. At one or
  two tokens this reads the condensed weight once and nothing else of size.
- :func:`matmul_chunks`: a ``lax.map`` over chunks of row blocks, x gathered along
  its feature axis (no transpose): a few to tens of tokens.
- :func:`matmul_blocks`: a ``lax.map`` over row blocks, x transposed once and gathered
  by rows (a gathered feature is a contiguous row of tokens): prefill sizes, where the
  batched form's (R, 4G, T) intermediate would not stay in cache.

What the CPU measurements (bench/RESULTS.md, "Kernel (issue 9)") ruled out: reading
only the stored values by selecting x per value from its 2-bit position, or gathering
x per value, fused into the reduction. XLA:CPU emits a fused reduction as a scalar
loop (no reassociation of float adds without fast-math), so those ran 0.5-0.8x of
dense even at 1 token, where the dot on the condensed weight ran 1.3-2.2x.

:func:`matmul_blocks_vjp` is the backward of every implementation; it reads the stored
arrays (values, meta, columns) and condenses one chunk of row blocks at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS, condense, positions, scatter

# Row blocks per lax.map step of the backward (its own chunk of condensed weight).
VJP_BLOCKS_PER_STEP = 2


def condensed_weight(values: jax.Array, meta: jax.Array, dtype=None) -> jax.Array:
  """The prepared condensed weight (R, 4G, V) in ``dtype`` (default: values')."""
  row_blocks, _, groups, v = values.shape
  dtype = values.dtype if dtype is None else dtype
  return condense(values.astype(dtype), meta).reshape(row_blocks, KEPT_COLUMNS * groups, v)


def flat_columns(columns: jax.Array) -> jax.Array:
  """columns (R, 4, G) -> (R, 4G) int32, the gather index of each condensed-weight row."""
  return columns.reshape(columns.shape[0], -1).astype(jnp.int32)


def _dot_first(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """a (K, A), b (K, B) -> a.T @ b (A, B), accumulated in float32 and cast to dtype."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(dtype)


def matmul_batched(x_pad: jax.Array, condensed: jax.Array, columns: jax.Array) -> jax.Array:
  """``y_blocks = x_pad @ W``: one gather of x for every row block, one batched dot.

  Args:
    x_pad: (T, G*M).
    condensed: (R, 4G, V), x's dtype.
    columns: (R, 4G) int32, :func:`flat_columns`.

  Returns:
    (T, R*V) in x_pad's dtype (float32 accumulation).
  """
  row_blocks, _, v = condensed.shape
  gathered = x_pad.T.at[columns].get(mode="promise_in_bounds")  # (R, 4G, T)
  y = lax.dot_general(condensed, gathered, (((1,), (1,)), ((0,), (0,))),
                      preferred_element_type=jnp.float32)  # (R, V, T)
  return y.astype(x_pad.dtype).reshape(row_blocks * v, -1).T


def matmul_blocks(x_pad: jax.Array, condensed: jax.Array, columns: jax.Array, *,
                  blocks_per_step: int) -> jax.Array:
  """``y_blocks = x_pad @ W``: a ``lax.map`` over ``blocks_per_step`` row blocks at a time.

  Args and result as for :func:`matmul_batched`. x is transposed once so that each
  gathered input feature is one contiguous row of tokens.
  """
  row_blocks, _, v = condensed.shape
  xt = x_pad.T  # (Kp, T)

  def one_block(block):
    block_weight, block_columns = block
    gathered = xt.at[block_columns].get(mode="promise_in_bounds")  # (4G, T)
    return _dot_first(block_weight, gathered, x_pad.dtype)  # (V, T)

  y = lax.map(one_block, (condensed, columns), batch_size=min(blocks_per_step, row_blocks))
  return y.reshape(row_blocks * v, -1).T


def matmul_chunks(x_pad: jax.Array, condensed: jax.Array, columns: jax.Array, *,
                  blocks_per_step: int) -> jax.Array:
  """``y_blocks = x_pad @ W``: a ``lax.map`` over chunks of row blocks, x gathered untransposed.

  Per step, ``blocks_per_step`` row blocks gather their kept features of x along its
  feature axis ((T, B, 4G), no transpose of x) and run one batched dot. Args and result
  as for :func:`matmul_batched`.
  """
  row_blocks, _, v = condensed.shape
  # XLA:CPU has no batched bf16 x bf16 -> f32 dot (DotThunk); the step's operands are
  # upcast in cache instead (same float32 accumulation).
  compute_dtype = jnp.promote_types(x_pad.dtype, jnp.float32)

  def one_block(block):
    block_weight, block_columns = block
    gathered = x_pad.at[:, block_columns].get(mode="promise_in_bounds")  # (T, 4G)
    y = lax.dot_general(gathered.astype(compute_dtype), block_weight.astype(compute_dtype),
                        (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x_pad.dtype)  # (T, V)

  y = lax.map(one_block, (condensed, columns), batch_size=min(blocks_per_step, row_blocks))
  return jnp.swapaxes(y, 0, 1).reshape(x_pad.shape[0], row_blocks * v)


def _chunks(tree, size: int):
  """Splits the leading (row-block) axis into (ceil(R/size), size), padding with zeros."""
  def split(a):
    pad = -a.shape[0] % size
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(-1, size, *a.shape[1:])
  return jax.tree.map(split, tree)


def matmul_blocks_vjp(x_pad: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array,
                      dy: jax.Array, *, blocks_per_step: int = VJP_BLOCKS_PER_STEP,
                      with_values: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Cotangents of ``y_blocks = x_pad @ W`` for x_pad and the stored values.

  Args:
    x_pad: (T, G*M); values: (R, 2, G, V); meta: (R, G, H) uint8; columns: (R, 4, G).
    dy: (T, R*V) cotangent of y_blocks.
    blocks_per_step: row blocks condensed and processed per scan step.
    with_values: compute dvalues (else None is returned for it: x's gradient only).

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
    value_grad = jnp.zeros((), jnp.float32)
    if with_values:
      gathered = xt.at[block_columns.reshape(-1)].get(mode="promise_in_bounds")  # (4G, T)
      weight_grad = lax.dot_general(gathered, block_dyt, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      weight_grad = weight_grad.reshape(KEPT_COLUMNS, groups, v)
      pos = positions(block_meta, v)  # (2, G, V)
      value_grad = jnp.take_along_axis(weight_grad, pos, axis=0)  # (2, G, V)
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
  if not with_values:
    return dxt.T.astype(x_pad.dtype), None
  value_grads = value_grads.reshape(-1, *value_grads.shape[2:])[:row_blocks]
  return dxt.T.astype(x_pad.dtype), value_grads.astype(values.dtype)


def reference(x_pad: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array, *,
              m: int) -> jax.Array:
  """Dense math: scatter the layout to a dense (G*M, R*V) weight, one float32 matmul.

  Returns (T, R*V) in x_pad's dtype, computed at the highest precision. The test and
  benchmark reference of every implementation (slow: it builds the dense weight).
  """
  dense = scatter(values, meta, columns, m, dtype=jnp.float32)
  return jnp.dot(x_pad.astype(jnp.float32), dense,
                 precision=lax.Precision.HIGHEST).astype(x_pad.dtype)
