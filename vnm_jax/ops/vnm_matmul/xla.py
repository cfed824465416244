"""The XLA implementation of the V:N:M matmul: the reference and the fallback that always works.

Raw arrays only (layout: :mod:`vnm_jax.ops.vnm_matmul.layout`). Every function takes x
zero-padded to G*M features and returns ``y_blocks`` (T, R*V), the outputs in row-block
order. Executed multiply-adds are 4/M of dense: each row block gathers its 4*G kept
input features of x and runs one dense dot against its condensed weight.

Two formulations of the forward on the *prepared* condensed weight (R, V, 4G) (each
row block's V output rows, contiguous over its 4G kept input features), chosen by token
count from measurements (:mod:`vnm_jax.ops.vnm_matmul.dispatch`):

- :func:`matmul_batched`: one gather of x (R, 4G, T) and one batched dot. At one or
  two tokens this reads the condensed weight once and nothing else of size.
- :func:`matmul_blocks`: a ``lax.map`` over row blocks, x transposed once and gathered
  by rows (a gathered feature is a contiguous row of tokens), one (V, 4G) @ (4G, T) dot
  per block: a few tokens and up, where the batched form's (R, 4G, T) intermediate
  would not stay in cache.

The (R, V, 4G) orientation is measured, not taken for granted: on 2 cores (4096x4096,
float32) its per-block dot ran 1.2-1.3x faster at 64-256 tokens than the (R, 4G, V)
one's first-axis contraction; an
earlier formulation that gathered x along its features (no transpose of x) won only at
4-16 tokens, and one layout has to serve every token count.

What the CPU measurements (bench/RESULTS.md, "Kernel (issue 9)") ruled out: reading
only the stored values by selecting x per value from its 2-bit position, or gathering
x per value, fused into the reduction. XLA:CPU emits a fused reduction as a scalar
loop (no reassociation of float adds without fast-math), so those ran 0.1-0.6x of
dense even at 1 token, where the dot on the condensed weight ran 1.2-2x.

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
  """The prepared condensed weight (R, V, 4G) in ``dtype`` (default: values').

  ``condensed[r, v, p*G + g]`` multiplies input feature ``columns[r, p, g]``.
  """
  row_blocks, _, groups, v = values.shape
  dtype = values.dtype if dtype is None else dtype
  condensed = condense(values.astype(dtype), meta).reshape(row_blocks, KEPT_COLUMNS * groups, v)
  return jnp.swapaxes(condensed, 1, 2)


def condensed_values(condensed: jax.Array, meta: jax.Array) -> jax.Array:
  """The stored values (R, 2, G, V) of a condensed weight, read back exactly."""
  row_blocks, v, _ = condensed.shape
  condensed = jnp.swapaxes(condensed, 1, 2).reshape(row_blocks, KEPT_COLUMNS, -1, v)
  return jnp.take_along_axis(condensed, positions(meta, v), axis=1)


def flat_columns(columns: jax.Array) -> jax.Array:
  """columns (R, 4, G) -> (R, 4G) int32, the gather index of each condensed-weight column."""
  return columns.reshape(columns.shape[0], -1).astype(jnp.int32)


def _cpu_dot_dtype(dtype):
  # XLA:CPU has no batched bf16 x bf16 -> f32 dot (DotThunk); there the operands are
  # upcast instead (per block in the blocks form; a pass over the weight in the batched
  # one: prepare in float32 for CPU inference), with the same float32 accumulation.
  if jax.default_backend() == "cpu":
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def matmul_batched(x_pad: jax.Array, condensed: jax.Array, columns: jax.Array) -> jax.Array:
  """``y_blocks = x_pad @ W``: one gather of x for every row block, one batched dot.

  Args:
    x_pad: (T, G*M).
    condensed: (R, V, 4G), x's dtype.
    columns: (R, 4G) int32, :func:`flat_columns`.

  Returns:
    (T, R*V) in x_pad's dtype (float32 accumulation).
  """
  row_blocks, v, _ = condensed.shape
  dtype = _cpu_dot_dtype(x_pad.dtype)
  gathered = x_pad.T.at[columns].get(mode="promise_in_bounds")  # (R, 4G, T)
  y = lax.dot_general(condensed.astype(dtype), gathered.astype(dtype),
                      (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  return y.astype(x_pad.dtype).reshape(row_blocks * v, -1).T  # (R, V, T) -> (T, R*V)


def matmul_blocks(x_pad: jax.Array, condensed: jax.Array, columns: jax.Array, *,
                  blocks_per_step: int) -> jax.Array:
  """``y_blocks = x_pad @ W``: a ``lax.map`` over ``blocks_per_step`` row blocks at a time.

  Args and result as for :func:`matmul_batched`. x is transposed once so that each
  gathered input feature is one contiguous row of tokens.
  """
  row_blocks, v, _ = condensed.shape
  dtype = _cpu_dot_dtype(x_pad.dtype)
  xt = x_pad.T  # (Kp, T)

  def one_block(block):
    block_weight, block_columns = block
    gathered = xt.at[block_columns].get(mode="promise_in_bounds")  # (4G, T)
    y = jnp.dot(block_weight.astype(dtype), gathered.astype(dtype),
                preferred_element_type=jnp.float32)
    return y.astype(x_pad.dtype)  # (V, T)

  y = lax.map(one_block, (condensed, columns), batch_size=min(blocks_per_step, row_blocks))
  return y.reshape(row_blocks * v, -1).T


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
