"""The execution layout, prepared once: :class:`PreparedVNMWeight` and :func:`prepare`.

A :class:`~vnm_jax.format.VNMWeight` is the stored format (what a checkpoint holds).
:func:`prepare` turns it, once, into the arrays an implementation's kernels read, in
the compute dtype, so that ``vnm_matmul`` on the result runs no XLA op on the weight:

- ``"xla"`` (CPU, and the fallback anywhere): :class:`XLALayout`, the condensed weight
  (R, 4G, V) with the 2:4 zeros stored (4/M of the dense bytes) and the flat column
  indices (R, 4G). Both XLA formulations read it.
- ``"pallas"`` (GPU; the Pallas interpreter elsewhere, for tests): :class:`PallasLayouts`,
  the decode kernel's pre-tiled packed layout (~the stored bytes) and, for M > 4, the
  prefill kernel's pre-tiled condensed weight (4/M of dense).

A prepared weight holds the layout and the small stored arrays (meta, columns,
output_index); the stored values are read back from the layout (``.weight``, exact),
so they are not resident twice. The device holds ``nbytes`` (resident) while a
checkpoint of ``.weight`` holds ``stored_nbytes``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.format import VNMWeight
from vnm_jax.masks import check_kernel_shape
from vnm_jax.ops.vnm_matmul import dispatch, pallas_decode, pallas_prefill, xla
from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = (None, "pallas", "xla")
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


class XLALayout(NamedTuple):
  """What the XLA formulations read.

  Attributes:
    condensed: (R, V, 4G) in the compute dtype; ``condensed[r, v, p*G + g]`` multiplies
      input feature ``columns[r, p*G + g]``.
    columns: (R, 4G) int32.
  """

  condensed: jax.Array
  columns: jax.Array


class PallasLayouts(NamedTuple):
  """What the Pallas kernels read: one layout per kernel, None where not prepared.

  Attributes:
    decode: :class:`vnm_jax.ops.vnm_matmul.pallas_decode.DecodeLayout`.
    prefill: :class:`vnm_jax.ops.vnm_matmul.pallas_prefill.PrefillLayout`, or None at
      M = 4 (2:4 runs dense FLOPs in the prefill kernel: decode takes every size).
  """

  decode: Any
  prefill: Any


def _nbytes(tree) -> int:
  return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedVNMWeight:
  """A stored V:N:M weight prepared for its implementation: what a call reads, once.

  A pytree (pass it through jit as an argument); ``shape``, ``config`` and
  ``implementation`` are static. The stored values are not kept twice: the layout
  holds them exactly (``weight`` reads them back) unless it was prepared in another
  dtype, in which case ``values`` keeps them.

  Attributes:
    layout: :class:`XLALayout` or :class:`PallasLayouts`, in the compute dtype.
    meta, columns, output_index: the stored layout arrays (see ``vnm_jax.format``).
    values: the stored values (R, 2, G, V) when the layout's dtype differs from theirs,
      else None.
    shape: (K, N); config: the VNMConfig; implementation: "xla" or "pallas".
  """

  layout: XLALayout | PallasLayouts
  meta: jax.Array
  columns: jax.Array
  output_index: jax.Array | None
  values: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  config: Any = dataclasses.field(metadata=dict(static=True))
  implementation: str = dataclasses.field(metadata=dict(static=True))

  @property
  def dtype(self):
    """The compute dtype the layout holds."""
    return jax.tree.leaves(self.layout)[0].dtype

  @property
  def weight(self) -> VNMWeight:
    """The stored :class:`~vnm_jax.format.VNMWeight`, exact (read back from the layout)."""
    values = self.values if self.values is not None else layout_values(
        self.layout, self.meta, self.config.v)
    return VNMWeight(values, self.meta, self.columns, self.output_index, self.shape,
                     self.config)

  @property
  def stored_nbytes(self) -> int:
    """Bytes of the stored weight (what a checkpoint of ``.weight`` holds)."""
    values_dtype = self.dtype if self.values is None else self.values.dtype
    values_shape = (self.meta.shape[0], 2, self.meta.shape[1], self.config.v)
    return (int(np.prod(values_shape)) * jnp.dtype(values_dtype).itemsize
            + _nbytes((self.meta, self.columns, self.output_index)))

  @property
  def nbytes(self) -> int:
    """Bytes resident on the device: the layout and the stored arrays it does not hold."""
    return _nbytes((self.layout, self.meta, self.columns, self.output_index, self.values))

  @property
  def dense_nbytes(self) -> int:
    """Bytes of the dense (K, N) kernel in the compute dtype."""
    return self.shape[0] * self.shape[1] * jnp.dtype(self.dtype).itemsize

  def __repr__(self) -> str:
    dense = self.dense_nbytes
    return (f"PreparedVNMWeight(shape={self.shape}, config={self.config}, "
            f"implementation={self.implementation!r}, dtype={self.dtype}, stored "
            f"{self.stored_nbytes} B ({self.stored_nbytes / dense:.3f} of dense), resident "
            f"{self.nbytes} B ({self.nbytes / dense:.3f} of dense))")


def layout_values(layout: XLALayout | PallasLayouts, meta: jax.Array, v: int) -> jax.Array:
  """The stored values (R, 2, G, V) a layout holds, read back exactly (pure jnp)."""
  if isinstance(layout, XLALayout):
    return xla.condensed_values(layout.condensed, meta)
  values = pallas_decode.stored_arrays(layout.decode)[0]
  return values[:, :, :meta.shape[1], :v]


def pallas_unsupported_reason(config, dtype) -> str | None:
  """Why the Pallas kernels cannot take a config with activations of ``dtype``, or None."""
  return pallas_decode.unsupported_reason(config.v, config.m, dtype)


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")


def resolve_implementation(implementation: str | None, config, dtype) -> str:
  """The implementation that runs: "pallas" or "xla" (a Pallas fallback is logged).

  None picks Pallas on a GPU and XLA elsewhere; "pallas" on a machine without a GPU
  runs the Pallas interpreter (correct, slow: for tests). A config or dtype the
  Pallas kernels cannot take runs XLA, with a warning on this module's logger.
  """
  check_implementation(implementation)
  if implementation == "xla" or (implementation is None and jax.default_backend() != "gpu"):
    return "xla"
  reason = pallas_unsupported_reason(config, dtype)
  if reason is not None:
    logger.warning("vnm_matmul: the Pallas kernels cannot take this weight (%s, config %s): "
                   "using the XLA implementation.", reason, config)
    return "xla"
  return "pallas"


def _check_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if dtype not in _FLOAT_DTYPES:
    raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
  return dtype


def build_layout(values: jax.Array, meta: jax.Array, columns: jax.Array, *, m: int,
                 implementation: str, dtype,
                 kernels: tuple[str, ...] = ("decode", "prefill")) -> XLALayout | PallasLayouts:
  """The layout of ``implementation`` in ``dtype`` from the stored arrays (pure jnp).

  Also runs inside jit (a VNMWeight prepared on the fly). ``kernels`` limits a Pallas
  layout to the kernels named (the others are None), so that preparing on the fly
  builds only what one call runs.
  """
  values = values.astype(dtype)
  if implementation == "xla":
    return XLALayout(xla.condensed_weight(values, meta), xla.flat_columns(columns))
  columns = columns.astype(jnp.int32)
  decode = (pallas_decode.prepare(values, meta, columns, m=m)
            if "decode" in kernels or m == KEPT_COLUMNS else None)
  prefill = (pallas_prefill.prepare(values, meta, columns, m=m)
             if "prefill" in kernels and m > KEPT_COLUMNS else None)
  return PallasLayouts(decode, prefill)


def prepare(w: VNMWeight, *, implementation: str | None = None, dtype=None,
            max_tokens: int | None = None, validate: bool = True) -> PreparedVNMWeight:
  """Prepares a stored weight, once, for ``vnm_matmul`` (module docstring).

  Args:
    w: a :class:`~vnm_jax.format.VNMWeight`.
    implementation: None (Pallas on a GPU when the kernels take the config and dtype,
      else XLA), "pallas" or "xla"; as for :func:`vnm_jax.vnm_matmul`.
    dtype: the compute dtype the layout is built in (the activations' dtype); default
      the stored values' dtype. A call with x of another dtype casts the layout per
      call.
    max_tokens: the most tokens a call will have, if known: only the layouts the
      dispatch picks up to it are built (Pallas: ``max_tokens=1`` for decode-only
      serving skips the prefill layout, 4/M of the dense bytes). Larger calls still
      run, on the layout there is.
    validate: run :meth:`VNMWeight.validate` first (needs concrete arrays; skipped
      for traced ones).

  Returns:
    A :class:`PreparedVNMWeight` (jit this call, or run it eagerly: it is pure jnp).

  Raises:
    TypeError: ``w`` is not a VNMWeight, or ``dtype`` is not a float dtype.
    ValueError: ``implementation`` or ``max_tokens`` is invalid, or ``w`` fails validation.
  """
  if not isinstance(w, VNMWeight):
    raise TypeError(f"w must be a VNMWeight (vnm_jax.compress), got {type(w).__name__}.")
  check_implementation(implementation)
  check_kernel_shape(w.shape, "w.shape")
  dtype = _check_dtype(w.values.dtype if dtype is None else dtype)
  if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                 or max_tokens < 1):
    raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}.")
  if validate and not isinstance(w.values, jax.core.Tracer):
    w.validate()
  used = resolve_implementation(implementation, w.config, dtype)
  kernels = ("decode", "prefill")
  if max_tokens is not None and dispatch.choose_pallas(max_tokens, w.config) == "decode":
    kernels = ("decode",)
  layout = build_layout(w.values, w.meta, w.columns, m=w.config.m, implementation=used,
                        dtype=dtype, kernels=kernels)
  return from_layout(w, layout, used)


def from_layout(w: VNMWeight, layout: XLALayout | PallasLayouts,
                implementation: str) -> PreparedVNMWeight:
  """The prepared weight of ``w`` with a layout built from it (keeps values only if needed)."""
  layout_dtype = jax.tree.leaves(layout)[0].dtype
  values = None if layout_dtype == w.values.dtype else w.values
  return PreparedVNMWeight(layout, w.meta, w.columns, w.output_index, values, w.shape,
                           w.config, implementation)
