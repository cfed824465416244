"""The V:N:M weight layout: the one place that packs, unpacks, condenses and scatters it.

For a Flax kernel (K, N) = (in_features, out_features) and a config V:2:M, let
Kp = ceil(K/M)*M, G = Kp/M input groups, Np = ceil(N/V)*V, R = Np/V row blocks and
H = ceil(V/2). The stored layout (``vnm_jax.format.VNMWeight``) is:

- ``values``  (R, 2, G, V): ``values[r, s, g, v]`` is the s-th kept entry (s = 0, 1 in
  increasing position) of output row ``r*V + v`` within group ``g``. The 2:4 zeros are
  not stored.
- ``meta``    (R, G, H) uint8: the 2-bit positions of those two entries among the
  group's 4 kept columns, a nibble ``pos0 | pos1 << 2`` per row, two rows per byte:
  the low nibble is row ``h``, the high nibble row ``h + H``.
- ``columns`` (R, 4, G) int32: ``columns[r, p, g]`` is the absolute input-feature index
  (into x zero-padded to Kp features) of the p-th kept column of group ``g`` in row
  block ``r``. An input permutation is folded in here.

So for row block r: ``y_blocks[:, rV:(r+1)V] = sum_p x_pad[:, columns[r, p]] @ W_p`` with
``W_p[g, v] = sum_s values[r, s, g, v] * (pos_s[r, g, v] == p)``: the outputs come in
row-block order (T, R*V), before an output permutation is undone and N is cropped.

The *condensed* weight (R, 4, G, V) materialises the 2:4 zeros: ``condensed[r, p, g, v]``
multiplies input feature ``columns[r, p, g]``, so one dense dot per row block computes
its outputs (4/M of the dense multiply-adds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vnm_jax.config import KEPT_COLUMNS, VNMConfig

__all__ = ["KEPT_COLUMNS", "condense", "layout_shapes", "pack", "pack_positions", "positions",
           "scatter", "value_inputs"]


def layout_shapes(shape: tuple[int, int], config: VNMConfig) -> dict[str, tuple[int, ...]]:
  """The shapes of the stored arrays of a (K, N) kernel: values, meta and columns."""
  k, n = shape
  groups, row_blocks, half = -(-k // config.m), -(-n // config.v), -(-config.v // 2)
  return dict(values=(row_blocks, 2, groups, config.v), meta=(row_blocks, groups, half),
              columns=(row_blocks, KEPT_COLUMNS, groups))


def positions(meta: jax.Array, v: int) -> jax.Array:
  """meta (..., G, H) uint8 -> the positions (..., 2, G, V) int32 (0..3) of the 2 kept entries."""
  nibbles = jnp.concatenate([meta & 15, meta >> 4], axis=-1)[..., :v].astype(jnp.int32)
  return jnp.stack([nibbles & 3, nibbles >> 2], axis=-3)


def pack_positions(pos: jax.Array) -> jax.Array:
  """The inverse of :func:`positions`: (..., 2, G, V) positions -> (..., G, H) uint8 meta."""
  v = pos.shape[-1]
  nibbles = (pos[..., 0, :, :] | (pos[..., 1, :, :] << 2)).astype(jnp.uint8)
  half = -(-v // 2)
  pad = [(0, 0)] * (nibbles.ndim - 1) + [(0, 2 * half - v)]
  nibbles = jnp.pad(nibbles, pad)
  return nibbles[..., :half] | (nibbles[..., half:] << 4)


def condense(values: jax.Array, meta: jax.Array) -> jax.Array:
  """(..., 2, G, V) values and (..., G, H) meta -> the condensed weight (..., 4, G, V)."""
  pos = positions(meta, values.shape[-1])
  # One broadcast select over the slot axis: XLA fuses it into a single loop, where
  # stacking 4 per-slot selects ran 3-4x slower on CPU.
  slot_bit = 1 << jnp.arange(KEPT_COLUMNS, dtype=jnp.int32).reshape(KEPT_COLUMNS, 1, 1)
  first_bit = (1 << pos[..., 0, :, :])[..., None, :, :]
  second_bit = (1 << pos[..., 1, :, :])[..., None, :, :]
  zero = jnp.zeros((), values.dtype)
  return jnp.where((first_bit & slot_bit) != 0, values[..., 0:1, :, :],
                   jnp.where((second_bit & slot_bit) != 0, values[..., 1:2, :, :], zero))


def value_inputs(meta: jax.Array, columns: jax.Array, v: int) -> jax.Array:
  """The absolute input index of every stored value: (R, 2, G, V) int32.

  ``value_inputs[r, s, g, v] = columns[r, pos_s[r, g, v], g]``.
  """
  pos = positions(meta, v)  # (R, 2, G, V)
  by_group = jnp.swapaxes(columns, 1, 2)[:, None]  # (R, 1, G, 4)
  return jnp.take_along_axis(jnp.broadcast_to(by_group, (*pos.shape[:3], KEPT_COLUMNS)),
                             pos, axis=-1)


def scatter(values: jax.Array, meta: jax.Array, columns: jax.Array, m: int, *,
            dtype=None) -> jax.Array:
  """The dense weight (G*M, R*V) of the layout, outputs in row-block order.

  Entries are added (so a layout with equal positions or repeated columns still has
  a defined dense meaning: the one every formulation computes). ``dtype`` defaults to
  values' dtype.
  """
  row_blocks, _, groups, v = values.shape
  inputs = value_inputs(meta, columns, v)
  outputs = jnp.broadcast_to(jnp.arange(row_blocks * v, dtype=jnp.int32)
                             .reshape(row_blocks, 1, 1, v), inputs.shape)
  dtype = values.dtype if dtype is None else dtype
  dense = jnp.zeros((groups * m, row_blocks * v), dtype)
  return dense.at[inputs, outputs].add(values.astype(dtype))


def _first_k_sorted(chosen: jax.Array, k: int) -> jax.Array:
  """Indices of the chosen entries along the last axis first, then the lowest others; k, sorted."""
  width = chosen.shape[-1]
  key = jnp.where(chosen, 0, width) + jnp.arange(width)
  return jnp.sort(jnp.argsort(key, axis=-1)[..., :k], axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def pack(kernel: jax.Array, mask: jax.Array, input_index: jax.Array, config: VNMConfig):
  """Packs a permuted (K, N) kernel with its mask into the stored layout.

  Args:
    kernel: (K, N) weights, already permuted to the order the mask's groups use.
    mask: (K, N) bool, in the same order.
    input_index: (K,) int: the original input feature of each of kernel's rows (folded
      into ``columns``).
    config: the V:N:M config.

  Returns:
    (values, meta, columns, structure_ok): the stored arrays, and a bool scalar that is
    True when every V x M block of the mask keeps at most 4 columns and every row at
    most 2 entries of a group (checked here, on the permuted mask, so that it is
    permuted once).
  """
  k, n = kernel.shape
  m, v = config.m, config.v
  kp, np_ = -(-k // m) * m, -(-n // v) * v
  g, r = kp // m, np_ // v
  padding = ((0, kp - k), (0, np_ - n))
  weights = jnp.pad(jnp.where(mask, kernel, 0), padding).reshape(g, m, r, v)
  kept = jnp.pad(mask, padding).reshape(g, m, r, v)
  weights, kept = weights.transpose(2, 0, 3, 1), kept.transpose(2, 0, 3, 1)  # (R, G, V, M)
  column_used = kept.any(axis=2)  # (R, G, M)
  structure_ok = ((column_used.sum(axis=-1) <= KEPT_COLUMNS).all()
                  & (kept.sum(axis=-1) <= config.n).all())

  slots = _first_k_sorted(column_used, KEPT_COLUMNS)  # (R, G, 4) columns within group
  slot_weights = jnp.take_along_axis(weights, slots[:, :, None, :], axis=-1)  # (R, G, V, 4)
  slot_kept = jnp.take_along_axis(kept, slots[:, :, None, :], axis=-1)
  pos = _first_k_sorted(slot_kept, config.n)  # (R, G, V, 2)
  values = jnp.take_along_axis(slot_weights, pos, axis=-1).transpose(0, 3, 1, 2)

  extended_index = jnp.concatenate([input_index.astype(jnp.int32),
                                    jnp.arange(k, kp, dtype=jnp.int32)])
  columns = extended_index[jnp.arange(g)[None, :, None] * m + slots].transpose(0, 2, 1)
  return values, pack_positions(pos.transpose(0, 3, 1, 2)), columns, structure_ok
