"""The compressed V:N:M weight format.

For a Flax kernel (K, N) = (in_features, out_features) and a config V:2:M, let
Kp = ceil(K/M)*M, G = Kp/M input groups, Np = ceil(N/V)*V, R = Np/V row blocks and
H = ceil(V/2). A :class:`VNMWeight` holds:

- ``values``  (R, 2, G, V), the kernel's dtype: ``values[r, s, g, v]`` is the s-th
  kept entry (s = 0, 1 in increasing position) of output row ``r*V + v`` (in
  permuted-output order) within group ``g``. The 2:4 zeros are not stored.
- ``meta``    (R, G, H) uint8: the 2-bit positions of those two entries among the
  group's 4 kept columns, a nibble ``pos0 | pos1 << 2`` per row, two rows per byte:
  the low nibble is row ``h``, the high nibble row ``h + H``.
- ``columns`` (R, 4, G) int32: ``columns[r, p, g]`` is the absolute input-feature
  index of the p-th kept column of group ``g`` in row block ``r``. An input
  permutation is folded in here; indices >= K point at the zero padding of x.
- ``output_index`` (N,) int32 or None: ``y = y_blocks[..., output_index]`` undoes an
  output permutation (it is ``argsort(permutation.outputs)``).

So for row block r: ``y[:, rV:(r+1)V] = sum_p x_pad[:, columns[r, p]] @ W_p`` with
``W_p[g, v] = sum_s values[r, s, g, v] * (pos_s[r, g, v] == p)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import RULES, is_vnm, vnm_mask
from vnm_jax.permutation import Permutation, inverse, permute, validate_permutation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VNMWeight:
  """A V:N:M-compressed Flax kernel (see the module docstring for the layout).

  A pytree: the arrays are children, ``shape`` (K, N) and ``config`` are static.
  """

  values: jax.Array
  meta: jax.Array
  columns: jax.Array
  output_index: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  config: VNMConfig = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def nbytes(self) -> int:
    """Bytes stored: values + meta + columns (+ output_index)."""
    arrays = (self.values, self.meta, self.columns, self.output_index)
    return sum(int(a.size) * a.dtype.itemsize for a in arrays if a is not None)

  @property
  def dense_nbytes(self) -> int:
    """Bytes of the dense (K, N) kernel in the same dtype."""
    return self.shape[0] * self.shape[1] * self.values.dtype.itemsize

  def __repr__(self) -> str:
    return (f"VNMWeight(shape={self.shape}, config={self.config}, dtype={self.dtype}, "
            f"nbytes={self.nbytes} ({self.nbytes / self.dense_nbytes:.3f} of dense))")


def unpack_positions(meta: jax.Array, v: int) -> jax.Array:
  """(R, G, H) uint8 meta -> (R, 2, G, V) uint8 positions (0..3) of the two kept entries."""
  nibbles = jnp.concatenate([meta & 0xF, meta >> 4], axis=-1)[..., :v]  # (R, G, V)
  return jnp.stack([nibbles & 0x3, nibbles >> 2], axis=1)


def _pack_positions(positions: jax.Array, v: int) -> jax.Array:
  """(R, G, V, 2) positions -> (R, G, H) uint8 meta."""
  nibbles = (positions[..., 0] | (positions[..., 1] << 2)).astype(jnp.uint8)
  half = -(-v // 2)
  nibbles = jnp.pad(nibbles, ((0, 0), (0, 0), (0, 2 * half - v)))
  return nibbles[..., :half] | (nibbles[..., half:] << 4)


def _first_k_sorted(chosen: jax.Array, k: int) -> jax.Array:
  """Indices of the chosen entries along the last axis first, then the lowest others; k of them, sorted."""
  width = chosen.shape[-1]
  key = jnp.where(chosen, 0, width) + jnp.arange(width)
  return jnp.sort(jnp.argsort(key, axis=-1)[..., :k], axis=-1)


@functools.partial(jax.jit, static_argnames=("config",))
def _pack(kernel: jax.Array, mask: jax.Array, input_index: jax.Array, config: VNMConfig):
  """Packs a permuted (K, N) kernel whose mask is V:N:M; input_index maps its rows to originals."""
  k, n = kernel.shape
  m, v = config.m, config.v
  kp, np_ = -(-k // m) * m, -(-n // v) * v
  g, r = kp // m, np_ // v
  padding = ((0, kp - k), (0, np_ - n))
  weights = jnp.pad(jnp.where(mask, kernel, 0), padding).reshape(g, m, r, v)
  kept = jnp.pad(mask, padding).reshape(g, m, r, v)
  weights, kept = weights.transpose(2, 0, 3, 1), kept.transpose(2, 0, 3, 1)  # (R, G, V, M)

  slots = _first_k_sorted(kept.any(axis=2), KEPT_COLUMNS)  # (R, G, 4) columns within group
  slot_weights = jnp.take_along_axis(weights, slots[:, :, None, :], axis=-1)  # (R, G, V, 4)
  slot_kept = jnp.take_along_axis(kept, slots[:, :, None, :], axis=-1)
  positions = _first_k_sorted(slot_kept, config.n)  # (R, G, V, 2)
  values = jnp.take_along_axis(slot_weights, positions, axis=-1).transpose(0, 3, 1, 2)

  extended_index = jnp.concatenate([input_index.astype(jnp.int32),
                                    jnp.arange(k, kp, dtype=jnp.int32)])
  columns = extended_index[jnp.arange(g)[None, :, None] * m + slots].transpose(0, 2, 1)
  return values, _pack_positions(positions, v), columns


def compress(kernel: jax.Array, config: VNMConfig | str, *, mask: jax.Array | None = None,
             scores: jax.Array | None = None, rule: str = "column_l1",
             permutation: Permutation | None = None) -> VNMWeight:
  """Compresses a 2D Flax kernel (in_features, out_features) to V:N:M.

  Args:
    kernel: (K, N) weights.
    config: a VNMConfig or "V:N:M" string.
    mask: a bool (K, N) mask that is V:N:M (after ``permutation``, if given); when
      None it is computed with :func:`vnm_mask` from ``scores`` and ``rule``.
    scores, rule: passed to :func:`vnm_mask` when ``mask`` is None.
    permutation: channel orderings the mask's groups were formed on. The input
      order is folded into ``columns``; the output order is kept as ``output_index``.

  Returns:
    A :class:`VNMWeight` with ``decompress(w) == kernel * mask`` exactly. Runs on
    the host (the mask's structure is checked); not for use inside jit.
  """
  config = VNMConfig.parse(config)
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"compress takes a 2D kernel (in_features, out_features), got shape "
                     f"{kernel.shape}; view an nD kernel with vnm_jax.as_matrix(kernel, in_axes).")
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
  validate_permutation(permutation, kernel.shape)
  if mask is None:
    mask = vnm_mask(kernel, config, scores=scores, rule=rule, permutation=permutation)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != kernel.shape:
      raise ValueError(f"mask must have the kernel's shape {kernel.shape}, got {mask.shape}.")
    if not is_vnm(mask, config, permutation=permutation):
      where = " after the permutation" if permutation is not None else ""
      raise ValueError(f"mask is not {config}{where}: some V x M block uses more than 4 input "
                       f"columns or some row keeps more than 2 of a group; compute it with "
                       f"vnm_mask(..., permutation=...).")
  k, n = kernel.shape
  inputs = (jnp.arange(k) if permutation is None or permutation.inputs is None
            else jnp.asarray(permutation.inputs))
  values, meta, columns = _pack(permute(kernel, permutation),
                                permute(mask.astype(bool), permutation), inputs, config)
  output_index = None
  if permutation is not None and permutation.outputs is not None:
    output_index = inverse(permutation.outputs).astype(jnp.int32)
  return VNMWeight(values, meta, columns, output_index, (k, n), config)


@jax.jit
def decompress(w: VNMWeight) -> jax.Array:
  """The dense (K, N) kernel a :class:`VNMWeight` stores: exactly ``kernel * mask``."""
  v = w.config.v
  r, _, g, _ = w.values.shape
  positions = unpack_positions(w.meta, v)  # (R, 2, G, V)
  # columns (R, 4, G) -> absolute input index of each stored value, (R, 2, G, V).
  rows_of_values = jnp.take_along_axis(w.columns[:, None, :, :, None].repeat(2, axis=1),
                                       positions[:, :, None].astype(jnp.int32),
                                       axis=2)[:, :, 0]
  outputs = (jnp.arange(r)[:, None, None, None] * v + jnp.arange(v)).astype(jnp.int32)
  dense = jnp.zeros((g * w.config.m, r * v), w.values.dtype)
  dense = dense.at[rows_of_values, jnp.broadcast_to(outputs, rows_of_values.shape)].set(w.values)
  dense = dense[:w.shape[0], :w.shape[1]]
  if w.output_index is not None:
    dense = dense[:, w.output_index]
  return dense
