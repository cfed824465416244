"""Pallas (Triton GPU) prefill kernel for ``y = x @ W``, W in the V:N:M layout, >= ~256 tokens.

At prefill sizes the time is multiply-adds: the condensed weight (the 2:4 zeros stored)
runs 4/M of the dense FLOPs with dense MMA, limits 2x (M=8) and 1.25x (M=5) of cuBLAS;
no Pallas route reaches Hopper's sparse MMA (Mosaic GPU emits dense wgmma only). To get
near the limit the kernel must look like a good dense GEMM tile:

- **Wide tiles, transposed output.** A program owns one row block (V outputs) and a
  token tile of BT tokens and accumulates the transposed output tile (V, BT) over the
  row block's 4G condensed inputs, BG groups (4*BG inputs) a step: ``acc += W @ Xg``
  with W the (V, 4*BG) condensed weight and Xg the (4*BG, BT) gathered activations,
  both operands of the wgmma straight from shared memory (in the (BT, V) orientation
  Triton loaded the gathered operand into registers with ldmatrix); the tile is
  transposed once, at the store. The gathered x tile is reused V times and the weight
  tile BT times: at V=128, BT=256 that is the reuse of cuBLAS's 128x256 tile (the
  kernel of issue 3 had 64-wide output tiles: half the reuse). Gathered-x traffic
  relative to a dense tile's ~1024/(V*M), so V=128 at M=8 is the natural fast config.
- **x transposed once per call** (one fused pad+transpose, x's bytes, ~5-10% of a
  4096-token matmul): a gathered input feature is then a contiguous row of BT tokens,
  so the gather is BT-wide, 16-byte-vectorised, asynchronous (cp.async) rows, whatever
  the columns (an input permutation costs nothing here).
- **Weight pre-tiled offline** (:func:`prepare`): ``weight`` (R, S, V, 4*BG) and
  ``columns`` (R, S, 4*BG), one contiguous block per program step, groups padded to
  S*BG with zero weights; each step's loads are one contiguous (V, 4*BG) block and
  4*BG indices. Condensed, not packed: the in-kernel expansion of packed values costs
  ALU work every token tile repeats (measured 0.34 vs 0.24 ms at 4096 tokens on an
  H200 with the kernel of issue 3), and prefill is not bound by weight bytes.
- **No split K, no crop.** Programs = row blocks x token tiles (512 at 4096 tokens,
  128:2:8, 4096 outputs), each writing its (BT, V) tile once, masked past T: no
  reduction op, no float32 partial sums, no slice of the output. Row blocks vary
  fastest in the launch order, so programs running together share their token
  tile's x^T rows in L2.

Backend: Triton (``pltriton.CompilerParams``), not Mosaic GPU: the kernel gathers rows
of x^T by the stored column indices (ref indexing with an int array, as jax's GPU paged
attention does); Mosaic GPU has no array-index loads on Hopper (TMA gather is Blackwell
only), so a gather there would be one TMA copy per row, 4*BG per step, issued from one
thread: not a path to write without a GPU to measure it. Triton still emits wgmma for
the dot on sm_90 and pipelines both operands (``num_stages``). Not measured on a GPU:
bench/gpu_kernels.py sweeps BG (prepare), BT, ``num_warps`` and ``num_stages``.
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
from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS, condense

MAX_TOKEN_TILE = 256
DEFAULT_BLOCK_GROUPS = 16  # 64 condensed inputs a step: 16 KiB of bf16 weight at V=128


class PrefillLayout(NamedTuple):
  """The prefill kernel's weight, pre-tiled by :func:`prepare` (a pytree of arrays).

  For R row blocks of V outputs and S steps of BG groups, a step's inputs ordered
  group-major (``i = g*4 + p`` for kept column p of group g):

  Attributes:
    weight: (R, S, V, 4*BG), the weight dtype: the condensed weight (2:4 zeros stored);
      ``weight[r, s, v, i]`` multiplies input ``columns[r, s, i]`` into output r*V + v.
    columns: (R, S, 4*BG) int32: absolute input features (0, with zero weight, past G).
  """

  weight: jax.Array
  columns: jax.Array


def unsupported_reason(v: int, m: int, dtype, tokens: int | None = None) -> str | None:
  """Why the prefill kernel cannot take V, M, dtype (and a token count), or None."""
  del tokens  # Any token count runs; below ~64-256 the decode kernel is the faster.
  return common.unsupported_reason(v, m, dtype)


@functools.partial(jax.jit, static_argnames=("m", "block_groups"))
def prepare(values: jax.Array, meta: jax.Array, columns: jax.Array, *, m: int,
            block_groups: int | None = None) -> PrefillLayout:
  """Stored layout (``vnm_jax.format.VNMWeight`` arrays) -> :class:`PrefillLayout`.

  Pure jnp (jitted), run once at conversion. Args: ``values`` (R, 2, G, V), ``meta`` (R, G, V/2)
  uint8, ``columns`` (R, 4, G) int32, ``m`` the config's M, ``block_groups`` (BG, a
  power of 2 >= 4: 4*BG >= 16 is the dot's depth) groups per step, default 16.
  """
  common.check_stored(values, meta, columns, m, "prefill")
  r, _, g, v = values.shape
  bg = DEFAULT_BLOCK_GROUPS if block_groups is None else block_groups
  if not common.is_power_of_2(bg) or KEPT_COLUMNS * bg < MIN_BLOCK:
    raise ValueError(f"block_groups must be a power of 2 >= {MIN_BLOCK // KEPT_COLUMNS}, "
                     f"got {bg!r}.")
  steps = -(-g // bg)
  condensed = jnp.pad(condense(values, meta), ((0, 0), (0, 0), (0, steps * bg - g), (0, 0)))
  weight = condensed.reshape(r, KEPT_COLUMNS, steps, bg, v).transpose(0, 2, 3, 1, 4)
  tiled_columns = jnp.pad(columns, ((0, 0), (0, 0), (0, steps * bg - g)))
  tiled_columns = tiled_columns.reshape(r, KEPT_COLUMNS, steps, bg).transpose(0, 2, 3, 1)
  weight = weight.reshape(r, steps, KEPT_COLUMNS * bg, v).transpose(0, 1, 3, 2)
  return PrefillLayout(weight=weight,
                       columns=tiled_columns.reshape(r, steps, KEPT_COLUMNS * bg))


def _kernel(xt_ref, weight_ref, columns_ref, y_ref, *, tokens: int):
  """One (row block r, token tile t) program.

  Refs: xt_ref (Kp, BT): x^T for this token tile (tokens padded); weight_ref
  (S, 4*BG, V) and columns_ref (S, 4*BG): this row block's steps; y_ref (T, R*V) whole,
  written at rows t*BT.. (masked past T) and columns r*V...
  """
  steps, v, _ = weight_ref.shape
  block_tokens = xt_ref.shape[1]
  precision = lax.Precision.HIGHEST if y_ref.dtype == jnp.float32 else None

  def step(s, acc):
    gathered = xt_ref[columns_ref[s], :]  # (4*BG, BT): contiguous token rows
    return acc + lax.dot(weight_ref[s], gathered, precision=precision,
                         preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((v, block_tokens), jnp.float32)).T
  first_row = pl.program_id(1) * block_tokens
  out = y_ref.at[pl.ds(first_row, block_tokens), pl.ds(pl.program_id(0) * v, v)]
  rows = first_row + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
  pltriton.store(out, acc.astype(y_ref.dtype), mask=rows < tokens)


def _validate(x, layout: PrefillLayout, m) -> None:
  if not isinstance(layout, PrefillLayout):
    raise TypeError(f"layout must be a PrefillLayout from prepare(), got "
                    f"{type(layout).__name__}.")
  common.check_x(x, m)
  weight, columns = layout
  if weight.ndim != 4:
    raise ValueError(f"layout.weight must be (R, S, V, 4*BG), got {weight.shape}.")
  r, s, v, kb = weight.shape
  if weight.dtype != x.dtype:
    raise TypeError(f"layout.weight must have x's dtype {x.dtype}, got {weight.dtype}.")
  if columns.shape != (r, s, kb) or columns.dtype != jnp.int32:
    raise ValueError(f"layout.columns must be int32 {(r, s, kb)}, got {columns.dtype} "
                     f"{columns.shape}.")
  if x.shape[1] > s * kb // KEPT_COLUMNS * m:
    raise ValueError(f"x has {x.shape[1]} features but the weight covers at most "
                     f"{s * kb // KEPT_COLUMNS * m} (S*BG*M).")


@functools.partial(jax.jit, static_argnames=("m", "block_tokens", "num_warps", "num_stages",
                                             "interpret"))
def matmul(x: jax.Array, layout: PrefillLayout, *, m: int, block_tokens: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None,
           interpret: bool = False) -> jax.Array:
  """``y_blocks = x @ W`` for many tokens: x^T (one fused XLA op), then one pallas_call.

  Args:
    x: (T, K) float32, bfloat16 or float16, the layout's dtype; K <= G*M.
    layout: a :class:`PrefillLayout` from :func:`prepare`.
    m: M of the config.
    block_tokens: token tile BT (power of 2 in [16, 256]); default the smallest power
      of 2 >= T, capped at 256.
    num_warps: Triton warps per program; default 8 when the (BT, V) tile has >= 128*128
      elements (two warpgroups of wgmma), else 4.
    num_stages: Triton pipeline depth (None: 3).
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    (T, R*V) in x's dtype, outputs in row-block order; float32 accumulation.
  """
  _validate(x, layout, m)
  tokens = x.shape[0]
  r, s, v, kb = layout.weight.shape
  if block_tokens is None:
    block_tokens = min(MAX_TOKEN_TILE, max(MIN_BLOCK, common.next_power_of_2(tokens)))
  if (not common.is_power_of_2(block_tokens)
      or not MIN_BLOCK <= block_tokens <= MAX_TOKEN_TILE):
    raise ValueError(f"block_tokens must be a power of 2 in [{MIN_BLOCK}, {MAX_TOKEN_TILE}] "
                     f"or None, got {block_tokens!r}.")
  if num_warps is None:
    num_warps = 8 if block_tokens * v >= 128 * 128 else 4
  tiles = -(-tokens // block_tokens)
  features = s * kb // KEPT_COLUMNS * m
  xt = jnp.pad(x, ((0, tiles * block_tokens - tokens), (0, features - x.shape[1]))).T
  out_shape = jax.ShapeDtypeStruct((tokens, r * v), x.dtype)
  return pl.pallas_call(
      functools.partial(_kernel, tokens=tokens),
      out_shape=out_shape,
      grid=(r, tiles),
      in_specs=[pl.BlockSpec((features, block_tokens), lambda i, t: (0, t)),
                pl.BlockSpec((None, s, v, kb), lambda i, t: (i, 0, 0, 0)),
                pl.BlockSpec((None, s, kb), lambda i, t: (i, 0, 0))],
      out_specs=pl.BlockSpec(out_shape.shape, lambda i, t: (0, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="vnm_prefill",
  )(xt, *layout)


def reference(x: jax.Array, layout: PrefillLayout, *, m: int) -> jax.Array:
  """Pure-jnp :func:`matmul`: the layout scattered to a dense matrix, one float32 dot."""
  _validate(x, layout, m)
  return _reference(x, layout, m)


@functools.partial(jax.jit, static_argnums=2)
def _reference(x, layout, m):
  weight, columns = layout
  weight = jnp.swapaxes(weight, 2, 3)  # (R, S, 4*BG, V)
  r, s, kb, v = weight.shape
  outputs = jnp.arange(r * v, dtype=jnp.int32).reshape(r, 1, 1, v)
  dense = jnp.zeros((s * kb // KEPT_COLUMNS * m, r * v), jnp.float32)
  dense = dense.at[jnp.broadcast_to(columns[..., None], weight.shape),
                   jnp.broadcast_to(outputs, weight.shape)].add(weight.astype(jnp.float32))
  x_pad = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, dense.shape[0] - x.shape[1])))
  return jnp.dot(x_pad, dense, precision=lax.Precision.HIGHEST).astype(x.dtype)
