"""Pallas (Triton GPU) decode kernel for ``y = x @ W``, W in the V:N:M layout, 1-64 tokens.

At decode sizes the time is reading the weight once: dense bf16 4096x4096 is 32 MiB, the
packed 64:2:8 weight 0.297x of it, so the byte limits are ~3.4x (64:2:8), ~2.1x (64:2:5)
and ~1.7x (2:4) of dense. FLOPs are nearly free. The design follows from that:

- **The packed bytes only.** The kernel reads the 2 kept values per output row and group
  and their 2-bit positions (a nibble), and expands the 4 condensed weight slots in
  registers (selects); the 2:4 zeros are never read. Each value and position byte is
  read by one program (the column indices by the J programs of their row block).
- **Pre-tiled offline** (:func:`prepare`): the weight is cut into per-program, per-step
  blocks that are contiguous in memory: ``values`` (R, J, S, 2, BG, BV), ``meta``
  (R, J, S, BG, BV/2) and ``columns`` (R, S, 4, BG), for BV outputs of a row block
  (J = V/BV slices) and BG groups per step (S steps, groups padded with zero weights).
- **Enough programs, no K split.** One program per (V slice, row block[, token tile]):
  slicing a row block's V outputs into J slices of BV >= 16 gives R*J >= ~2 programs per
  SM of an H200 (132 SMs) without splitting K, so there are no partial sums to combine:
  one pallas_call, output written once in x's dtype (no reduction op, no float32
  buffer to zero and cast). The price: the J programs of a row block each read its
  column indices (1/4 of a values step at BV=16; L2 hits after the first) and gather x.
- **No XLA op per call.** x (T, K) is read as it is (no pad, no transpose): the kernel
  gathers ``x[t, columns]`` (x is small at decode and stays in L1/L2; column indices
  >= K, the format's zero padding, are clamped and zeroed in-kernel) and stores y with
  a token mask, so ragged T and K need no padding op around the call.
- **Any token count, one code path**: per step four (BT, BG) @ (BG, BV) dots, one per
  kept-column slot, BT a power of 2 >= 16 (Triton's smallest dot); rows past T are
  clamped on load and masked on store. At one token the 16 rows read one address (in
  the sm_90 build 16 lanes of a warp share a column: a broadcast) and the dot's extra
  rows are free; a dot-free one-token path was
  tried and dropped: Triton software-pipelines only loops that feed a dot, and
  unpipelined its loads waited a DRAM latency every step (SASS of the sm_90 build).

Backend: Triton (``pltriton.CompilerParams``), not Mosaic GPU: the kernel gathers x by
the stored column indices (ref indexing with int arrays, as jax's GPU paged attention
does), which Mosaic GPU cannot do on Hopper (no array-index loads; TMA gather is
Blackwell-only), and the in-register expansion (uint8 nibbles, selects) is plain
elementwise Triton code. Kept to what the Triton lowering accepts: power-of-2 loaded
shapes, no scalar prefetch, no ``pl.load``/``pl.store`` (ref indexing; masked stores
through ``pltriton.store``). Deprecated in jax 0.11 but present (issue 3's kernel ran on
it on an H200 with jax 0.11.2).
Not yet measured on a GPU: bench/gpu_kernels.py sweeps ``block_v``, ``block_groups``,
``num_warps`` and ``num_stages`` against cuBLAS.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from vnm_jax.ops.vnm_matmul import _pallas_common as common
from vnm_jax.ops.vnm_matmul._pallas_common import MIN_BLOCK
from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS, pack_positions, positions, scatter

MAX_TOKEN_TILE = 64  # largest token tile (registers: four (BT, BG) x tiles, twice)
# Programs to aim for: ~2 per SM of an H100/H200 (132 SMs), so HBM sees enough loads
# in flight without splitting K.
TARGET_PROGRAMS = 264
# Bytes of values one program reads per step: 2 * BG * BV * itemsize.
TARGET_STEP_BYTES = 4096
# Triton pipeline depth: stages - 1 steps of weight in flight per program. At ~2 programs
# per SM, 3 x ~4.6 KiB keeps ~28 KiB per SM in flight (4.8 TB/s x ~1 us / 132 SMs ~ 36 KiB).
DEFAULT_STAGES = 4


class DecodeLayout(NamedTuple):
  """The decode kernel's weight, pre-tiled by :func:`prepare` (a pytree of arrays).

  For R row blocks of V outputs, J = V/BV output slices, S steps of BG groups:

  Attributes:
    values: (R, J, S, 2, BG, BV), the weight dtype: ``values[r, j, s, q, g, b]`` is the
      q-th kept value of output ``r*V + j*BV + b`` in group ``s*BG + g`` (0 past G).
    meta: (R, J, S, BG, BV//2) uint8: its positions among the 4 kept columns, a nibble
      ``pos0 | pos1 << 2`` per output; byte h holds output 2h (low) and 2h+1 (high).
    columns: (R, S, 4, BG) int32: the input feature of each kept column (0 past G).
  """

  values: jax.Array
  meta: jax.Array
  columns: jax.Array


def unsupported_reason(v: int, m: int, dtype, tokens: int | None = None) -> str | None:
  """Why the decode kernel cannot take V, M, dtype (and a token count), or None."""
  del tokens  # Any token count runs; above MAX_TOKEN_TILE it tiles tokens (slower).
  return common.unsupported_reason(v, m, dtype)


def default_blocks(v: int, groups: int, row_blocks: int, dtype) -> tuple[int, int]:
  """(block_v, block_groups) for a weight: enough programs, ~4 KiB of values a step."""
  block_v = v
  while block_v > MIN_BLOCK and row_blocks * (v // block_v) < TARGET_PROGRAMS:
    block_v //= 2
  target = TARGET_STEP_BYTES // (2 * block_v * jnp.dtype(dtype).itemsize)
  block_groups = max(MIN_BLOCK, min(common.next_power_of_2(target),
                                    common.next_power_of_2(groups)))
  return block_v, block_groups


@functools.partial(jax.jit, static_argnames=("m", "block_v", "block_groups"))
def prepare(values: jax.Array, meta: jax.Array, columns: jax.Array, *, m: int,
            block_v: int | None = None, block_groups: int | None = None) -> DecodeLayout:
  """Stored layout (``vnm_jax.format.VNMWeight`` arrays) -> :class:`DecodeLayout`.

  Pure jnp (jitted), run once at conversion. Args: ``values`` (R, 2, G, V), ``meta`` (R, G, V/2)
  uint8, ``columns`` (R, 4, G) int32, ``m`` the config's M; ``block_v`` (BV, a power of
  2 in [16, V]) outputs per program and ``block_groups`` (BG, a power of 2 >= 16)
  groups per step, defaults from :func:`default_blocks`.
  """
  common.check_stored(values, meta, columns, m, "decode")
  r, _, g, v = values.shape
  default_v, default_g = default_blocks(v, g, r, values.dtype)
  bv = default_v if block_v is None else block_v
  bg = default_g if block_groups is None else block_groups
  if not common.is_power_of_2(bv) or not MIN_BLOCK <= bv <= v:
    raise ValueError(f"block_v must be a power of 2 in [{MIN_BLOCK}, V={v}], got {bv!r}.")
  if not common.is_power_of_2(bg) or bg < MIN_BLOCK:
    raise ValueError(f"block_groups must be a power of 2 >= {MIN_BLOCK}, got {bg!r}.")
  steps, slices = -(-g // bg), v // bv
  pad = ((0, 0),) * 2 + ((0, steps * bg - g), (0, 0))
  tiled_values = jnp.pad(values, pad).reshape(r, 2, steps, bg, slices, bv)
  pos = positions(meta, v)  # (R, 2, G, V)
  nibbles = jnp.pad((pos[:, 0] | (pos[:, 1] << 2)).astype(jnp.uint8), pad[1:])
  nibbles = nibbles.reshape(r, steps, bg, slices, bv // 2, 2)
  tiled_meta = nibbles[..., 0] | (nibbles[..., 1] << 4)
  tiled_columns = jnp.pad(columns, pad[:3]).reshape(r, KEPT_COLUMNS, steps, bg)
  return DecodeLayout(values=tiled_values.transpose(0, 4, 2, 1, 3, 5),
                      meta=tiled_meta.transpose(0, 3, 1, 2, 4),
                      columns=tiled_columns.transpose(0, 2, 1, 3))


def _slot_weights(values_ref, meta_ref, step):
  """The step's packed tile -> the (BG, BV) weight of each of the 4 kept-column slots."""
  first, second = values_ref[step, 0], values_ref[step, 1]  # (BG, BV)
  packed = meta_ref[step]  # (BG, BV/2) uint8: outputs 2h (low nibble), 2h+1 (high)
  bg, half = packed.shape
  nibbles = jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(bg, 2 * half)
  nibbles = nibbles.astype(jnp.int32)
  pos0, pos1 = nibbles & 3, nibbles >> 2
  zero = jnp.zeros((), first.dtype)
  return [jnp.where(pos0 == p, first, jnp.where(pos1 == p, second, zero))
          for p in range(KEPT_COLUMNS)]


def _gather_x(x_ref, tokens_index, columns):
  """x[tokens, columns] with columns >= K (the format's zero padding) reading 0."""
  k = x_ref.shape[-1]
  x = x_ref[tokens_index, jnp.minimum(columns, k - 1)]
  return jnp.where(columns < k, x, jnp.zeros((), x.dtype))


def _kernel(x_ref, values_ref, meta_ref, columns_ref, y_ref, *, block_tokens: int):
  """One (V slice j, row block r, token tile t) program: four (BT, BG) @ (BG, BV) dots a step.

  Refs: x_ref (T, K) and y_ref (T, R*V) whole; values_ref (S, 2, BG, BV), meta_ref
  (S, BG, BV/2) uint8 and columns_ref (S, 4, BG) int32: this program's blocks. Token
  rows past T are read at row T-1 (in bounds; at T = 1 the 16 rows are one address, a
  broadcast) and not stored. Triton pipelines the weight loads (``num_stages``); the x
  gather (2-byte elements, too small for its async copies) is issued one step ahead by
  hand, so its L1/L2 latency overlaps the step before it.
  """
  steps, _, bg, bv = values_ref.shape
  tokens = x_ref.shape[0]
  slices = pl.num_programs(0)
  rows = pl.program_id(2) * block_tokens + lax.broadcasted_iota(
      jnp.int32, (block_tokens, 1), 0)
  tokens_index = jnp.broadcast_to(jnp.minimum(rows, tokens - 1), (block_tokens, bg))
  precision = lax.Precision.HIGHEST if y_ref.dtype == jnp.float32 else None

  def columns(s):  # the step's 4 column vectors (BG,)
    s = jnp.minimum(s, steps - 1)
    return tuple(columns_ref[s, p] for p in range(KEPT_COLUMNS))

  def gather(cols):
    return tuple(_gather_x(x_ref, tokens_index, jnp.broadcast_to(c[None, :], (block_tokens, bg)))
                 for c in cols)

  def step(s, carry):
    # Loads for later steps go first and are used an iteration later: the column
    # indices two steps ahead, the x gather (which needs them) one step ahead.
    acc, xs, next_columns = carry
    carry_columns, next_xs = columns(s + 2), gather(next_columns)
    for x, weight in zip(xs, _slot_weights(values_ref, meta_ref, s)):
      acc += lax.dot(x, weight, precision=precision, preferred_element_type=jnp.float32)
    return acc, next_xs, carry_columns

  init = (jnp.zeros((block_tokens, bv), jnp.float32), gather(columns(0)), columns(1))
  acc = lax.fori_loop(0, steps, step, init)[0]
  first_output = (pl.program_id(1) * slices + pl.program_id(0)) * bv
  out = y_ref.at[pl.ds(pl.program_id(2) * block_tokens, block_tokens), pl.ds(first_output, bv)]
  pltriton.store(out, acc.astype(y_ref.dtype), mask=rows < tokens)


def _validate(x, layout: DecodeLayout, m) -> None:
  if not isinstance(layout, DecodeLayout):
    raise TypeError(f"layout must be a DecodeLayout from prepare(), got {type(layout).__name__}.")
  common.check_x(x, m)
  values, meta, columns = layout
  if values.ndim != 6 or values.shape[3] != 2:
    raise ValueError(f"layout.values must be (R, J, S, 2, BG, BV), got {values.shape}.")
  r, j, s, _, bg, bv = values.shape
  if values.dtype != x.dtype:
    raise TypeError(f"layout.values must have x's dtype {x.dtype}, got {values.dtype}.")
  if meta.shape != (r, j, s, bg, bv // 2) or meta.dtype != jnp.uint8:
    raise ValueError(f"layout.meta must be uint8 {(r, j, s, bg, bv // 2)}, got {meta.dtype} "
                     f"{meta.shape}.")
  if columns.shape != (r, s, KEPT_COLUMNS, bg) or columns.dtype != jnp.int32:
    raise ValueError(f"layout.columns must be int32 {(r, s, KEPT_COLUMNS, bg)}, got "
                     f"{columns.dtype} {columns.shape}.")
  if x.shape[1] > s * bg * m:
    raise ValueError(f"x has {x.shape[1]} features but the weight covers at most "
                     f"{s * bg * m} (S*BG*M).")


@functools.partial(jax.jit, static_argnames=("m", "block_tokens", "num_warps", "num_stages",
                                             "interpret"))
def matmul(x: jax.Array, layout: DecodeLayout, *, m: int, block_tokens: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None,
           interpret: bool = False) -> jax.Array:
  """``y_blocks = x @ W`` for a few tokens: one pallas_call, nothing around it.

  Args:
    x: (T, K) float32, bfloat16 or float16, the layout's dtype; K <= G*M.
    layout: a :class:`DecodeLayout` from :func:`prepare`.
    m: M of the config.
    block_tokens: token tile of the dot path (power of 2 in [16, 64]); default the
      smallest power of 2 >= T, capped at 64.
    num_warps: Triton warps per program; default 4 for a 16-token tile, 8 above (the
      x tiles in flight spill 4 warps' registers at 32 tokens, in the sm_90 build).
    num_stages: Triton pipeline depth; default 4: three steps of weight in flight per
      program, ~14 KiB at the default blocks.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (T, R*V) in x's dtype, outputs in row-block order; float32 accumulation.
  """
  _validate(x, layout, m)
  tokens = x.shape[0]
  r, j = layout.values.shape[:2]
  bv = layout.values.shape[-1]
  blocked = lambda a: pl.BlockSpec((None, None, *a.shape[2:]),  # noqa: E731
                                   lambda jj, rr, *_: (rr, jj) + (0,) * (a.ndim - 2))
  whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
  if block_tokens is None:
    block_tokens = min(MAX_TOKEN_TILE, max(MIN_BLOCK, common.next_power_of_2(tokens)))
  if (not common.is_power_of_2(block_tokens)
      or not MIN_BLOCK <= block_tokens <= MAX_TOKEN_TILE):
    raise ValueError(f"block_tokens must be a power of 2 in [{MIN_BLOCK}, {MAX_TOKEN_TILE}] "
                     f"or None, got {block_tokens!r}.")
  grid = (j, r, -(-tokens // block_tokens))
  if num_warps is None:
    num_warps = 4 if block_tokens <= MIN_BLOCK else 8
  columns_spec = pl.BlockSpec((None, *layout.columns.shape[1:]),
                              lambda jj, rr, *_: (rr, 0, 0, 0))
  out_shape = jax.ShapeDtypeStruct((tokens, r * j * bv), x.dtype)
  return pl.pallas_call(
      functools.partial(_kernel, block_tokens=block_tokens),
      out_shape=out_shape,
      grid=grid,
      in_specs=[whole(x), blocked(layout.values), blocked(layout.meta), columns_spec],
      out_specs=whole(out_shape),
      compiler_params=pltriton.CompilerParams(
          num_warps=num_warps, num_stages=DEFAULT_STAGES if num_stages is None else num_stages),
      interpret=interpret,
      name="vnm_decode",
  )(x, *layout)


def reference(x: jax.Array, layout: DecodeLayout, *, m: int) -> jax.Array:
  """Pure-jnp :func:`matmul`: the layout scattered to a dense matrix, one float32 dot."""
  _validate(x, layout, m)
  return _reference(x, layout, m)


@jax.jit
def stored_arrays(layout: DecodeLayout) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inverse of :func:`prepare`: the stored (values, meta, columns), groups padded to S*BG."""
  values, meta, columns = layout
  r, j, s, _, bg, bv = values.shape
  nibbles = jnp.stack([meta & 15, meta >> 4], axis=-1).reshape(r, j, s, bg, bv)
  nibbles = nibbles.transpose(0, 2, 3, 1, 4).reshape(r, s * bg, j * bv).astype(jnp.int32)
  stored_meta = pack_positions(jnp.stack([nibbles & 3, nibbles >> 2], axis=1))
  stored_values = values.transpose(0, 3, 2, 4, 1, 5).reshape(r, 2, s * bg, j * bv)
  return stored_values, stored_meta, columns.transpose(0, 2, 1, 3).reshape(r, KEPT_COLUMNS, -1)


@functools.partial(jax.jit, static_argnums=2)
def _reference(x, layout, m):
  dense = scatter(*stored_arrays(layout), m, dtype=jnp.float32)
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, dense.shape[0] - x.shape[1])))
  return jnp.dot(x_pad, dense, precision=lax.Precision.HIGHEST).astype(x.dtype)
