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

A prepared weight keeps the stored :class:`~vnm_jax.format.VNMWeight` too (``.weight``,
exact): the backward pass reads it, and it is what a checkpoint should hold. So the
device holds ``nbytes`` (resident: stored + layout) while a checkpoint of ``.weight``
holds ``stored_nbytes``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vnm_jax.format import VNMWeight, check_kernel_shape
from vnm_jax.ops.vnm_matmul import dispatch, pallas_decode, pallas_prefill, xla
from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = (None, "pallas", "xla")
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


class XLALayout(NamedTuple):
  """What the XLA formulations read.

  Attributes:
    condensed: (R, 4G, V) in the compute dtype; ``condensed[r, p*G + g, v]`` multiplies
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
  """A :class:`~vnm_jax.format.VNMWeight` with the arrays its implementation reads.

  A pytree (pass it through jit as an argument); ``implementation`` is static.

  Attributes:
    weight: the stored weight, exact (``decompress(prepared.weight)`` is the kernel).
    layout: :class:`XLALayout` or :class:`PallasLayouts`, in the compute dtype.
    implementation: "xla" or "pallas".
  """

  weight: VNMWeight
  layout: XLALayout | PallasLayouts
  implementation: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    return self.weight.shape

  @property
  def config(self):
    return self.weight.config

  @property
  def dtype(self):
    """The compute dtype the layout holds."""
    return jax.tree.leaves(self.layout)[0].dtype

  @property
  def stored_nbytes(self) -> int:
    """Bytes of the stored weight (what a checkpoint of ``.weight`` holds)."""
    return self.weight.nbytes

  @property
  def nbytes(self) -> int:
    """Bytes resident on the device: the stored weight plus the prepared layout."""
    return self.weight.nbytes + _nbytes(self.layout)

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
  if validate and not isinstance(w.values, jax.core.Tracer):
    w.validate()
  if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                 or max_tokens < 1):
    raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}.")
  used = resolve_implementation(implementation, w.config, dtype)
  kernels = ("decode", "prefill")
  if max_tokens is not None and dispatch.choose_pallas(max_tokens, w.config) == "decode":
    kernels = ("decode",)
  layout = build_layout(w.values, w.meta, w.columns, m=w.config.m, implementation=used,
                        dtype=dtype, kernels=kernels)
  return PreparedVNMWeight(w, layout, used)
