"""Pallas (Triton GPU) kernels for ``y = x @ W`` with W in the compressed V:N:M layout.

Raw arrays only (no Flax); the layout is the one of ``vnm_jax.format.VNMWeight``:
for K inputs, M inputs per group, G = ceil(K/M) groups, R row blocks of V outputs and
H = V // 2,

- ``values``  (R, 2, G, V): the two kept values of every output row in every group,
- ``meta``    (R, G, H) uint8: their 2-bit positions among the group's 4 kept
  columns, ``pos0 | pos1 << 2``; low nibble row h, high nibble row h + H,
- ``columns`` (R, 4, G) int32: absolute input index (into x zero-padded to G*M
  features) of each of the 4 kept columns of a group,

and ``y_blocks[:, r*V:(r+1)*V] = sum_p x_pad[:, columns[r, p]] @ W_p[r]`` with
``W_p[r][g, v] = values[r, s, g, v]`` where ``pos_s[r, g, v] == p`` (else 0).
The outputs are in the row blocks' order, (T, R*V); undoing an output permutation
and cropping to N is the caller's business.

Both kernels: grid (K splits, token tiles, row blocks). A program loops over its
share of the groups, ``block_groups`` at a time; a step gathers the 4*BG kept input
features of x by the stored indices (x is passed transposed, so each gathered
feature is a contiguous row of tokens) and runs one dot against the step's
(4*BG, V) condensed weight, accumulating in float32. They differ in where that
weight tile comes from:

- :func:`vnm_matmul_pallas_condensed` reads it from a condensed weight (R, 4, G, V)
  with the 2:4 zeros stored (:func:`vnm_jax.ops.vnm_matmul.layout.condense`): 4/M of the
  dense weight's bytes.
- :func:`vnm_matmul_pallas_packed` expands it in-kernel from the 2 stored values and
  their 2-bit positions: ~2/M of the dense bytes plus 1 byte per 2 rows per group.

:func:`vnm_matmul_pallas`, the entry the library uses, condenses the weight (XLA,
under the same jit) and runs the condensed kernel: on an H200 (bf16, 4096x4096,
bench/RESULTS.md) the condensed kernel was the faster one at every token count
measured: 1.4-1.9x at 1024-4096 tokens, 1.1-1.25x at 16-256. The
expansion is ALU work in the inner loop of every program (each token tile redoes
it), and the weight bytes it saves matter only where reading weights bounds the
time, which at decode sizes launch latency hides.

What the kernels keep to, so that the Triton lowering takes them: power-of-2 block
shapes for every loaded value, gathers by indexing a ref with int arrays (as jax's
GPU paged attention does), no scalar prefetch, no ``pl.load``, and the Triton
backend chosen explicitly (``pltriton.CompilerParams``; Mosaic GPU is the default
from jax 0.11). Groups past G in the last step are read at a clamped index and
weighted 0, so nothing is padded on the weight side; tokens are padded in the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS, condense

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Triton's dot needs every dimension >= 16; a row block (V outputs) is one dot's width.
MIN_DOT_SIZE = 16
MIN_V = MIN_DOT_SIZE
# Programs to aim for when splitting K for small token counts: about 2 per SM of a
# current GPU (132 on an H100/H200); more splits measured slower (their partial
# sums cost a reduction).
TARGET_PROGRAMS = 256


def _is_power_of_2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(v: int, dtype) -> str | None:
  """Why the kernel cannot take a row-block size V and dtype, or None if it can."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    return f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16, float16"
  if not _is_power_of_2(v) or v < MIN_V:
    return (f"V={v} is not a power of 2 >= {MIN_V} (the Triton lowering needs power-of-2 "
            f"tiles and dots of width V >= {MIN_DOT_SIZE})")
  return None


def _precision(dtype):
  # Triton's default for a float32 dot is tf32; float32 callers get full float32.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _step_rows(step: jax.Array, block_groups: int, groups: int):
  """The 4*BG condensed-weight rows of one loop step, slot-major.

  Returns (slot, group, in_range), each (4*BG,) int32/bool: row j belongs to slot
  j // BG of group step*BG + j % BG. Groups past the last one are clamped to G-1
  (an in-bounds read) and flagged, so their weight can be zeroed.
  """
  rows = lax.broadcasted_iota(jnp.int32, (KEPT_COLUMNS * block_groups,), 0)
  slot = rows >> (block_groups.bit_length() - 1)
  group = step * block_groups + (rows & (block_groups - 1))
  return slot, jnp.minimum(group, groups - 1), group < groups


def _packed_kernel(xt_ref, values_ref, meta_ref, columns_ref, out_ref, *, groups: int,
                   block_groups: int, steps_per_split: int):
  """One (K split, token tile, row block) program on the packed layout.

  Refs (leading block axes squeezed):
    xt_ref: (G*M, BT) x transposed, every input feature of this token tile.
    values_ref: (2, G, V); meta_ref: (G, V/2) uint8; columns_ref: (4, G) int32.
    out_ref: (BT, V): this K split's partial sums (the output when unsplit).
  Per step: gather the 4*BG kept input features, expand the (4*BG, V) condensed
  weight from the 2 stored values and their positions, one dot.
  """
  block_tokens, v = out_ref.shape
  half = meta_ref.shape[-1]
  rows = KEPT_COLUMNS * block_groups
  first_step = pl.program_id(0) * steps_per_split
  lane = lax.broadcasted_iota(jnp.int32, (rows, v), 1)

  def step(i, acc):
    slot, group, in_range = _step_rows(first_step + i, block_groups, groups)
    gathered = xt_ref[columns_ref[slot, group], :]  # (4BG, BT)
    # Output row v's nibble: low half of byte v for v < V/2, high half of byte v - V/2.
    byte = meta_ref[jnp.broadcast_to(group[:, None], (rows, v)), lane & (half - 1)]
    byte = byte.astype(jnp.int32)
    nibble = jnp.where(lane >= half, byte >> 4, byte) & 15
    keep = in_range[:, None]
    slot = slot[:, None]
    weight = jnp.where(keep & ((nibble & 3) == slot), values_ref[0, group, :],
                       jnp.where(keep & (((nibble >> 2) & 3) == slot),
                                 values_ref[1, group, :], 0))  # (4BG, V)
    return acc + lax.dot_general(gathered, weight, (((0,), (0,)), ((), ())),
                                 precision=_precision(gathered.dtype),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps_per_split, step, jnp.zeros((block_tokens, v), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _check_block(name: str, value: int | None, *, minimum: int) -> None:
  if value is not None and (not isinstance(value, int) or not _is_power_of_2(value)
                            or value < minimum):
    raise ValueError(f"{name} must be a power of 2 >= {minimum} or None, got {value!r}.")


def validate_inputs(x, values, meta, columns, m: int) -> None:
  """Raises ValueError/TypeError naming the argument if the arrays do not fit the layout."""
  if x.ndim != 2:
    raise ValueError(f"x must be 2D (tokens, in_features), got shape {x.shape}.")
  if values.ndim != 4 or values.shape[1] != 2:
    raise ValueError(f"values must have shape (R, 2, G, V), got {values.shape}.")
  r, _, g, v = values.shape
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}.")
  if values.dtype != x.dtype:
    raise TypeError(f"values must have x's dtype {x.dtype}, got {values.dtype}.")
  if meta.shape != (r, g, -(-v // 2)) or meta.dtype != jnp.uint8:
    raise ValueError(f"meta must be uint8 of shape {(r, g, -(-v // 2))}, got {meta.dtype} "
                     f"{meta.shape}.")
  if columns.shape != (r, KEPT_COLUMNS, g) or columns.dtype != jnp.int32:
    raise ValueError(f"columns must be int32 of shape {(r, KEPT_COLUMNS, g)}, got "
                     f"{columns.dtype} {columns.shape}.")
  if not isinstance(m, int) or m < KEPT_COLUMNS:
    raise ValueError(f"m must be an int >= {KEPT_COLUMNS}, got {m!r}.")
  if x.shape[1] > g * m:
    raise ValueError(f"x has {x.shape[1]} features but the weight covers G*M = {g}*{m} = "
                     f"{g * m}.")


def choose_blocks(tokens: int, groups: int, row_blocks: int, *, block_tokens: int | None = None,
                  block_groups: int | None = None, k_splits: int | None = None
                  ) -> tuple[int, int, int]:
  """Default (block_tokens, block_groups, k_splits) for a problem; given values are kept.

  Token tiles of up to 128 rows (16 at least: Triton's smallest dot); 16 groups (64
  gathered input features) per step, 32 for small token counts; and the group loop
  split across programs when token tiles x row blocks would leave SMs idle. These
  were the fastest of bench/kernel.py --tune on an H200 (4096x4096, bf16).
  """
  if block_tokens is None:
    block_tokens = min(128, max(MIN_DOT_SIZE, _next_power_of_2(tokens)))
  if block_groups is None:
    block_groups = 16 if tokens > 64 else 32
  if k_splits is None:
    programs = -(-tokens // block_tokens) * row_blocks
    steps = -(-groups // block_groups)
    k_splits = max(1, min(steps, TARGET_PROGRAMS // max(programs, 1)))
  return block_tokens, block_groups, k_splits


def _condensed_kernel(xt_ref, weight_ref, columns_ref, out_ref, *, groups: int,
                      block_groups: int, steps_per_split: int):
  """Like :func:`_packed_kernel`, reading a condensed weight (4, G, V) with the 2:4 zeros."""
  block_tokens, v = out_ref.shape
  first_step = pl.program_id(0) * steps_per_split

  def step(i, acc):
    slot, group, in_range = _step_rows(first_step + i, block_groups, groups)
    gathered = xt_ref[columns_ref[slot, group], :]  # (4BG, BT)
    weight = jnp.where(in_range[:, None], weight_ref[slot, group, :], 0)  # (4BG, V)
    return acc + lax.dot_general(gathered, weight, (((0,), (0,)), ((), ())),
                                 precision=_precision(gathered.dtype),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps_per_split, step, jnp.zeros((block_tokens, v), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


_LAUNCH_STATICS = ("m", "block_tokens", "block_groups", "k_splits", "num_warps", "num_stages",
                   "interpret")


def _launch(kernel_fn, x, weight_arrays, columns, *, m, block_tokens, block_groups, k_splits,
            num_warps, num_stages, interpret):
  """Pads x, builds the grid and BlockSpecs, runs the kernel, adds K-split partial sums.

  ``weight_arrays`` are (R, ...) arrays whose leading row-block axis is blocked one
  block per program and whose other axes are passed whole.
  """
  _check_block("block_tokens", block_tokens, minimum=MIN_DOT_SIZE)
  _check_block("block_groups", block_groups, minimum=MIN_DOT_SIZE)
  if k_splits is not None and (isinstance(k_splits, bool) or not isinstance(k_splits, int)
                               or k_splits < 1):
    raise ValueError(f"k_splits must be a positive int or None, got {k_splits!r}.")
  tokens, features = x.shape
  row_blocks, _, groups = columns.shape
  v = weight_arrays[0].shape[-1]
  block_tokens, block_groups, k_splits = choose_blocks(
      tokens, groups, row_blocks, block_tokens=block_tokens, block_groups=block_groups,
      k_splits=k_splits)
  steps = -(-groups // block_groups)
  k_splits = min(k_splits, steps)
  steps_per_split = -(-steps // k_splits)

  padded_tokens = -(-tokens // block_tokens) * block_tokens
  xt = jnp.pad(x, ((0, padded_tokens - tokens), (0, groups * m - features))).T
  split = k_splits > 1

  def whole_row_block(a):
    return pl.BlockSpec((None, *a.shape[1:]),
                        lambda s, i, r, ndim=a.ndim: (r,) + (0,) * (ndim - 1))

  out = pl.pallas_call(
      functools.partial(kernel_fn, groups=groups, block_groups=block_groups,
                        steps_per_split=steps_per_split),
      out_shape=jax.ShapeDtypeStruct((k_splits, padded_tokens, row_blocks * v),
                                     jnp.float32 if split else x.dtype),
      grid=(k_splits, padded_tokens // block_tokens, row_blocks),
      in_specs=[pl.BlockSpec((groups * m, block_tokens), lambda s, i, r: (0, i)),
                *[whole_row_block(a) for a in (*weight_arrays, columns)]],
      out_specs=pl.BlockSpec((None, block_tokens, v), lambda s, i, r: (s, i, r)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=kernel_fn.__name__.strip("_"),
  )(xt, *weight_arrays, columns)
  out = out.sum(axis=0).astype(x.dtype) if split else out[0]
  return out[:tokens]


@functools.partial(jax.jit, static_argnames=_LAUNCH_STATICS)
def vnm_matmul_pallas(x: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array, *,
                      m: int, block_tokens: int | None = None, block_groups: int | None = None,
                      k_splits: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, interpret: bool = False) -> jax.Array:
  """``y_blocks = x @ W`` for W in the compressed layout (module docstring).

  Condenses the weight (one XLA elementwise op) and runs
  :func:`vnm_matmul_pallas_condensed`; arguments and result as for
  :func:`vnm_matmul_pallas_packed`.
  """
  validate_inputs(x, values, meta, columns, m)
  reason = unsupported_reason(values.shape[-1], x.dtype)
  if reason is not None:
    raise ValueError(f"vnm_matmul_pallas cannot take this weight: {reason}.")
  return _launch(_condensed_kernel, x, (condense(values, meta),), columns, m=m,
                 block_tokens=block_tokens, block_groups=block_groups, k_splits=k_splits,
                 num_warps=num_warps, num_stages=num_stages, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_LAUNCH_STATICS)
def vnm_matmul_pallas_packed(x: jax.Array, values: jax.Array, meta: jax.Array,
                             columns: jax.Array, *, m: int, block_tokens: int | None = None,
                             block_groups: int | None = None, k_splits: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None,
                             interpret: bool = False) -> jax.Array:
  """``y_blocks = x @ W``, expanding the 2:4 step in-kernel from the packed values.

  Args:
    x: (T, K) float32, bfloat16 or float16, K <= G*M.
    values: (R, 2, G, V), x's dtype; V a power of 2 >= 16.
    meta: (R, G, V//2) uint8.
    columns: (R, 4, G) int32, each in [0, G*M).
    m: M of the config (the zero-padded width of x is G*M).
    block_tokens: tokens per program (power of 2 >= 16); default from T.
    block_groups: M-groups per loop step (power of 2 >= 16); default 32.
    k_splits: programs that share one output tile's groups (their float32 partial
      sums are added by XLA); default: enough programs to fill the GPU.
    num_warps, num_stages: Triton compiler parameters (None: Pallas's defaults).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    (T, R*V) in x's dtype, outputs in row-block order; float32 accumulation.
  """
  validate_inputs(x, values, meta, columns, m)
  reason = unsupported_reason(values.shape[-1], x.dtype)
  if reason is not None:
    raise ValueError(f"vnm_matmul_pallas_packed cannot take this weight: {reason}.")
  return _launch(_packed_kernel, x, (values, meta), columns, m=m, block_tokens=block_tokens,
                 block_groups=block_groups, k_splits=k_splits, num_warps=num_warps,
                 num_stages=num_stages, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_LAUNCH_STATICS)
def vnm_matmul_pallas_condensed(x: jax.Array, condensed: jax.Array, columns: jax.Array, *,
                                m: int, block_tokens: int | None = None,
                                block_groups: int | None = None, k_splits: int | None = None,
                                num_warps: int | None = None, num_stages: int | None = None,
                                interpret: bool = False) -> jax.Array:
  """``y_blocks = x @ W`` from a condensed weight (R, 4, G, V) with the 2:4 zeros stored.

  ``condensed[r, p, g, v]`` multiplies input feature ``columns[r, p, g]``
  (:func:`vnm_jax.ops.vnm_matmul.layout.condense` builds it). V must be a power of 2 >= 16.
  Other arguments and the result as for :func:`vnm_matmul_pallas_packed`.
  """
  if x.ndim != 2 or condensed.ndim != 4 or condensed.shape[1] != KEPT_COLUMNS:
    raise ValueError(f"x must be (T, K) and condensed (R, 4, G, V), got {x.shape} and "
                     f"{condensed.shape}.")
  if condensed.dtype != x.dtype:
    raise TypeError(f"condensed must have x's dtype {x.dtype}, got {condensed.dtype}.")
  r, _, g, v = condensed.shape
  if columns.shape != (r, KEPT_COLUMNS, g) or columns.dtype != jnp.int32:
    raise ValueError(f"columns must be int32 of shape {(r, KEPT_COLUMNS, g)}, got "
                     f"{columns.dtype} {columns.shape}.")
  if not _is_power_of_2(v) or v < MIN_DOT_SIZE:
    raise ValueError(f"V={v} must be a power of 2 >= {MIN_DOT_SIZE} for the condensed kernel.")
  if x.shape[1] > g * m:
    raise ValueError(f"x has {x.shape[1]} features but the weight covers G*M = {g * m}.")
  return _launch(_condensed_kernel, x, (condensed,), columns, m=m, block_tokens=block_tokens,
                 block_groups=block_groups, k_splits=k_splits, num_warps=num_warps,
                 num_stages=num_stages, interpret=interpret)


def vnm_matmul_reference(x: jax.Array, values: jax.Array, meta: jax.Array, columns: jax.Array,
                         *, m: int) -> jax.Array:
  """Pure-jnp dense math for :func:`vnm_matmul_pallas`: scatter W to dense, then one matmul.

  Returns (T, R*V) in x's dtype, computed in float32 at highest precision.
  """
  validate_inputs(x, values, meta, columns, m)
  return _reference(x, values, meta, columns, m)


@functools.partial(jax.jit, static_argnums=4)
def _reference(x, values, meta, columns, m):
  row_blocks, _, groups, v = values.shape
  nibbles = jnp.concatenate([meta & 15, meta >> 4], axis=-1)[..., :v].astype(jnp.int32)
  positions = jnp.stack([nibbles & 3, nibbles >> 2], axis=1)  # (R, 2, G, V)
  inputs = jnp.take_along_axis(columns[:, None, :, :, None],  # (R, 1, 4, G, 1)
                               positions[:, :, None], axis=2)[:, :, 0]  # (R, 2, G, V)
  outputs = jnp.broadcast_to(jnp.arange(row_blocks * v).reshape(row_blocks, 1, 1, v),
                             inputs.shape)
  dense = jnp.zeros((groups * m, row_blocks * v), jnp.float32)
  dense = dense.at[inputs, outputs].add(values.astype(jnp.float32))
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, groups * m - x.shape[1])))
  return jnp.dot(x_pad, dense, precision=lax.Precision.HIGHEST).astype(x.dtype)
