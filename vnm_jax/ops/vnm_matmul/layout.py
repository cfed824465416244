"""The condensed weight layout both V:N:M matmul paths run their dots on.

From the stored layout (``vnm_jax.format.VNMWeight``): ``values`` (..., 2, G, V), the
two kept values of each output row per group, and ``meta`` (..., G, H) uint8, their
2-bit positions among the group's 4 kept columns (``pos0 | pos1 << 2``; low nibble
row h, high nibble row h + H), to the condensed weight (..., 4, G, V) in which
``condensed[..., p, g, v]`` multiplies input feature ``columns[..., p, g]``: the 2:4
zeros are materialised, so one dense dot per row block computes its outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vnm_jax.config import KEPT_COLUMNS


def positions_of(meta: jax.Array, v: int) -> tuple[jax.Array, jax.Array]:
  """meta (..., G, H) uint8 -> (pos0, pos1), each (..., G, V) int32 in 0..3."""
  nibbles = jnp.concatenate([meta & 15, meta >> 4], axis=-1)[..., :v].astype(jnp.int32)
  return nibbles & 3, nibbles >> 2


def condense(values: jax.Array, meta: jax.Array) -> jax.Array:
  """(..., 2, G, V) values and (..., G, H) meta -> the condensed weight (..., 4, G, V)."""
  pos0, pos1 = positions_of(meta, values.shape[-1])
  # One broadcast select over the slot axis: XLA fuses it into a single loop, where
  # stacking 4 per-slot selects ran 3-4x slower on CPU.
  slot_bit = 1 << jnp.arange(KEPT_COLUMNS, dtype=jnp.int32).reshape(KEPT_COLUMNS, 1, 1)
  first_bit = (1 << pos0)[..., None, :, :]
  second_bit = (1 << pos1)[..., None, :, :]
  zero = jnp.zeros((), values.dtype)
  return jnp.where((first_bit & slot_bit) != 0, values[..., 0:1, :, :],
                   jnp.where((second_bit & slot_bit) != 0, values[..., 1:2, :, :], zero))
