"""The compressed V:N:M weight format: :class:`VNMWeight`, :func:`compress`, :func:`decompress`.

The layout of the arrays (values, 2-bit positions, absolute column indices) is defined
in :mod:`vnm_jax.ops.vnm_matmul.layout`, the one module that packs and unpacks it. A
:class:`VNMWeight` adds ``output_index`` (N,) int32 or None: ``y = y_blocks[...,
output_index]`` undoes an output permutation (it is ``argsort(permutation.outputs)``),
and the static ``shape`` (K, N) and ``config``.

This is the *stored* format (what a checkpoint holds). What a kernel reads is prepared
from it once: :func:`vnm_jax.ops.vnm_matmul.prepare`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.masks import RULES, check_kernel_shape, vnm_mask
from vnm_jax.ops.vnm_matmul import layout
from vnm_jax.permutation import Permutation, inverse, permute, validate_permutation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VNMWeight:
  """A V:N:M-compressed Flax kernel (layout: :mod:`vnm_jax.ops.vnm_matmul.layout`).

  A pytree: the arrays are children, ``shape`` (K, N) and ``config`` are static.
  Building one from arrays does not check them (it also happens under jit); call
  :meth:`validate` on concrete arrays, or :meth:`check` under
  ``jax.experimental.checkify``.

  Attributes:
    values: (R, 2, G, V) floating, the two kept values of each output row per group.
    meta: (R, G, H) uint8, their 2-bit positions among the group's 4 kept columns.
    columns: (R, 4, G) int32, the absolute input feature of each kept column.
    output_index: (N,) int32 or None, a permutation undoing the output order.
    shape: (K, N) = (in_features, out_features).
    config: the VNMConfig.
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
    """Bytes stored (what a checkpoint holds): values + meta + columns (+ output_index)."""
    arrays = (self.values, self.meta, self.columns, self.output_index)
    return sum(int(a.size) * a.dtype.itemsize for a in arrays if a is not None)

  @property
  def dense_nbytes(self) -> int:
    """Bytes of the dense (K, N) kernel in the same dtype."""
    return self.shape[0] * self.shape[1] * self.values.dtype.itemsize

  def __repr__(self) -> str:
    return (f"VNMWeight(shape={self.shape}, config={self.config}, dtype={self.dtype}, "
            f"nbytes={self.nbytes} ({self.nbytes / self.dense_nbytes:.3f} of dense))")

  def validate(self) -> VNMWeight:
    """Checks the arrays against ``shape``, ``config`` and the layout; returns self.

    Host-side (numpy), so the arrays must be concrete: run it where a weight is built
    or restored (``compress``, the layers and ``prepare`` do). Under jit use
    :meth:`check` with ``jax.experimental.checkify`` instead.

    Raises:
      ValueError: naming the field and the first bad index: an array of the wrong
        shape or dtype, a column out of [0, G*M) or repeated within a group, two equal
        positions for one row, an output_index that is not a permutation of range(N).
      TypeError: the arrays are tracers (inside jit).
    """
    _validate_static(self)
    for name in ("values", "meta", "columns", "output_index"):
      if isinstance(getattr(self, name), jax.core.Tracer):
        raise TypeError(f"VNMWeight.validate needs concrete arrays, but {name} is traced "
                        f"(inside jit): use VNMWeight.check under jax.experimental.checkify.")
    _validate_contents(self)
    return self

  def check(self) -> None:
    """:meth:`validate`'s content checks as ``checkify.check``s (for use under jit).

    Shapes and dtypes raise at trace time; the contents are checked when the function
    is wrapped by ``jax.experimental.checkify.checkify``, e.g.::

      def forward(x, w):
        w.check()
        return vnm_jax.vnm_matmul(x, w)
      error, y = checkify.checkify(jax.jit(forward))(x, w)
      error.throw()

    Without ``checkify.checkify`` around it, ``check`` inside jit is an error (jax
    refuses an unfunctionalised check), so the fast path never pays for it.
    """
    _validate_static(self)
    k, n = self.shape
    groups, v = self.values.shape[2], self.config.v
    columns = self.columns.astype(jnp.int32)
    checkify.check(jnp.all((columns >= 0) & (columns < groups * self.config.m)),
                   f"VNMWeight.columns: an index is out of [0, {groups * self.config.m})")
    sorted_columns = jnp.sort(columns, axis=1)
    checkify.check(jnp.all(sorted_columns[:, 1:] != sorted_columns[:, :-1]),
                   "VNMWeight.columns: a group repeats a column")
    pos = layout.positions(self.meta, v)
    checkify.check(jnp.all(pos[:, 0] != pos[:, 1]),
                   "VNMWeight.meta: a row has two equal positions")
    if self.output_index is not None:
      index = self.output_index.astype(jnp.int32)
      in_range = jnp.all((index >= 0) & (index < n))
      seen = jnp.zeros((n,), jnp.int32).at[jnp.clip(index, 0, n - 1)].add(1)
      checkify.check(in_range & jnp.all(seen == 1),
                     f"VNMWeight.output_index is not a permutation of range({n})")
    del k


def _validate_static(w: VNMWeight) -> None:
  """Shapes and dtypes against ``shape`` and ``config`` (no array contents)."""
  if not isinstance(w.config, VNMConfig):
    raise TypeError(f"VNMWeight.config must be a VNMConfig, got {w.config!r}.")
  check_kernel_shape(w.shape, "VNMWeight.shape")
  expected = layout.layout_shapes(w.shape, w.config)
  for name, dtype_ok, allowed in (
      ("values", lambda d: jnp.issubdtype(d, jnp.floating), "a floating dtype"),
      ("meta", lambda d: d == jnp.uint8, "dtype uint8"),
      ("columns", lambda d: jnp.issubdtype(d, jnp.integer), "an integer dtype")):
    array = getattr(w, name)
    if tuple(jnp.shape(array)) != expected[name]:
      raise ValueError(f"VNMWeight.{name} must have shape {expected[name]} for a kernel of "
                       f"shape {w.shape} at {w.config}, got {tuple(jnp.shape(array))}.")
    if not dtype_ok(jnp.result_type(array)):
      raise ValueError(f"VNMWeight.{name} must have {allowed}, got {jnp.result_type(array)}.")
  if w.output_index is not None:
    if tuple(jnp.shape(w.output_index)) != (w.shape[1],):
      raise ValueError(f"VNMWeight.output_index must have shape ({w.shape[1]},) or be None, "
                       f"got {tuple(jnp.shape(w.output_index))}.")
    if not jnp.issubdtype(jnp.result_type(w.output_index), jnp.integer):
      raise ValueError(f"VNMWeight.output_index must be integer, got "
                       f"{jnp.result_type(w.output_index)}.")


def _first(bad: np.ndarray) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(bad)[0])


def _validate_contents(w: VNMWeight) -> None:
  groups, v, m = w.values.shape[2], w.config.v, w.config.m
  columns = np.asarray(w.columns).astype(np.int64)
  bad = (columns < 0) | (columns >= groups * m)
  if bad.any():
    index = _first(bad)
    raise ValueError(f"VNMWeight.columns{list(index)} = {columns[index]} is out of range "
                     f"[0, {groups * m}) (G*M = {groups}*{m}).")
  ordered = np.sort(columns, axis=1)
  repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)  # (R, G)
  if repeated.any():
    r, g = _first(repeated)
    raise ValueError(f"VNMWeight.columns[{r}, :, {g}] = {columns[r, :, g].tolist()} repeats a "
                     f"column: the {KEPT_COLUMNS} kept columns of a group must be distinct.")
  meta = np.asarray(w.meta)
  nibbles = np.concatenate([meta & 15, meta >> 4], axis=-1)[..., :v]  # (R, G, V)
  equal = (nibbles & 3) == (nibbles >> 2)
  if equal.any():
    r, g, row = _first(equal)
    half = meta.shape[-1]
    raise ValueError(f"VNMWeight.meta: row {row} of group {g} in row block {r} (byte "
                     f"meta[{r}, {g}, {row % half}]) has two equal positions "
                     f"{int(nibbles[r, g, row] & 3)}; its 2 kept entries need distinct ones.")
  if w.output_index is not None:
    n = w.shape[1]
    index = np.asarray(w.output_index).astype(np.int64)
    outside = (index < 0) | (index >= n)
    if outside.any():
      (i,) = _first(outside)
      raise ValueError(f"VNMWeight.output_index[{i}] = {index[i]} is out of range [0, {n}): "
                       f"it must be a permutation of range({n}).")
    first_seen = np.unique(index, return_index=True)[1]
    if len(first_seen) != n:
      duplicate = np.setdiff1d(np.arange(n), first_seen)[0]
      raise ValueError(f"VNMWeight.output_index[{duplicate}] = {index[duplicate]} repeats an "
                       f"earlier entry: it must be a permutation of range({n}).")


def compress(kernel: jax.Array, config: VNMConfig | str, *, mask: jax.Array | None = None,
             scores: jax.Array | None = None, rule: str = "column_l1",
             permutation: Permutation | None = None) -> VNMWeight:
  """Compresses a 2D Flax kernel (in_features, out_features) to V:N:M.

  The permutation is validated once and the kernel (and the mask or scores) permuted
  once; the mask's structure is checked on the permuted mask while packing.

  Args:
    kernel: (K, N) weights.
    config: a VNMConfig or "V:N:M" string.
    mask: a bool (K, N) mask that is V:N:M (after ``permutation``, if given); when
      None it is computed with :func:`vnm_jax.vnm_mask` from ``scores`` and ``rule``.
    scores, rule: passed to :func:`vnm_jax.vnm_mask` when ``mask`` is None.
    permutation: channel orderings the mask's groups were formed on. The input
      order is folded into ``columns``; the output order is kept as ``output_index``.

  Returns:
    A validated :class:`VNMWeight` with ``decompress(w) == kernel * mask`` exactly.
    Runs on the host (the mask's structure is checked); not for use inside jit. Under
    ``jax.eval_shape`` (to get a checkpoint's target structure) the checks are skipped.
  """
  config = VNMConfig.parse(config)
  kernel = jnp.asarray(kernel)
  shape = check_kernel_shape(kernel.shape)
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
  validate_permutation(permutation, shape)
  permuted_kernel = permute(kernel, permutation)
  if mask is None:
    # Groups are formed on the permuted kernel: the mask comes out permuted, as packed.
    permuted_scores = None if scores is None else permute(jnp.asarray(scores), permutation)
    if permuted_scores is not None and permuted_scores.shape != shape:
      raise ValueError(f"scores must have the kernel's shape {shape}, got "
                       f"{permuted_scores.shape}.")
    permuted_mask = vnm_mask(permuted_kernel, config, scores=permuted_scores, rule=rule)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != shape:
      raise ValueError(f"mask must have the kernel's shape {shape}, got {mask.shape}.")
    permuted_mask = permute(mask != 0, permutation)
  inputs = (jnp.arange(shape[0]) if permutation is None or permutation.inputs is None
            else jnp.asarray(permutation.inputs))
  values, meta, columns, structure_ok = layout.pack(permuted_kernel, permuted_mask, inputs,
                                                    config)
  if isinstance(structure_ok, jax.core.Tracer):  # jax.eval_shape (abstract structure): no checks
    return VNMWeight(values, meta, columns, _output_index(permutation), shape, config)
  if not bool(structure_ok):
    where = " after the permutation" if permutation is not None else ""
    raise ValueError(f"mask is not {config}{where}: some V x M block uses more than 4 input "
                     f"columns or some row keeps more than 2 of a group; compute it with "
                     f"vnm_mask(..., permutation=...).")
  return VNMWeight(values, meta, columns, _output_index(permutation), shape, config).validate()


def _output_index(permutation: Permutation | None) -> jax.Array | None:
  if permutation is None or permutation.outputs is None:
    return None
  return inverse(permutation.outputs).astype(jnp.int32)


@jax.jit
def decompress(w: VNMWeight) -> jax.Array:
  """The dense (K, N) kernel a :class:`VNMWeight` stores: exactly ``kernel * mask``."""
  dense = layout.scatter(w.values, w.meta, w.columns, w.config.m)[:w.shape[0], :w.shape[1]]
  if w.output_index is not None:
    dense = dense[:, w.output_index]
  return dense
