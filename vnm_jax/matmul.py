"""``vnm_matmul(x, w)``: ``y = x @ W`` for a compressed :class:`~vnm_jax.format.VNMWeight`.

One public op with two implementations:

- ``"pallas"``: :func:`pallas_kernels.vnm_matmul.vnm_matmul_pallas` (Triton on a
  GPU; the Pallas interpreter on a machine without one: correct, slow, for tests);
- ``"xla"``: :mod:`vnm_jax.matmul_xla`, the reference and the fallback that always works.

``implementation=None`` picks Pallas on a GPU and XLA elsewhere. When the Pallas
kernel cannot take a weight (V not a power of 2 >= 16, or a dtype it does not
support) the op logs a warning on the ``vnm_jax.matmul`` logger and runs XLA.

Both are differentiable for x and for ``w.values`` (a ``custom_vjp`` whose backward
is the XLA path), so a compressed model can be fine-tuned directly.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import vnm_matmul as pallas_vnm
from vnm_jax import matmul_xla
from vnm_jax.format import VNMWeight

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = (None, "pallas", "xla")


def pallas_unsupported_reason(w: VNMWeight, dtype) -> str | None:
  """Why the Pallas kernel cannot take weight ``w`` with activations of ``dtype``, or None."""
  return pallas_vnm.unsupported_reason(w.config.v, dtype)


def resolve_implementation(implementation: str | None, w: VNMWeight, dtype) -> str:
  """The implementation ``vnm_matmul`` will run: "pallas" or "xla" (logs a fallback)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation == "xla" or (implementation is None and jax.default_backend() != "gpu"):
    return "xla"
  reason = pallas_unsupported_reason(w, dtype)
  if reason is not None:
    logger.warning("vnm_matmul: the Pallas kernel cannot take this weight (%s, config %s, "
                   "shape %s): using the XLA implementation.", reason, w.config, w.shape)
    return "xla"
  return "pallas"


def _pad_features(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _matmul_blocks(x, values, meta, columns, m: int, implementation: str, interpret: bool):
  """(T, K) x and the raw weight arrays -> y_blocks (T, R*V) in x's dtype."""
  if implementation == "pallas":
    return pallas_vnm.vnm_matmul_pallas(x, values, meta, columns, m=m, interpret=interpret)
  groups = values.shape[2]
  return matmul_xla.matmul_blocks(_pad_features(x, groups * m), values, meta, columns)


def _matmul_blocks_fwd(x, values, meta, columns, m, implementation, interpret):
  y = _matmul_blocks(x, values, meta, columns, m, implementation, interpret)
  return y, (x, values, meta, columns)


def _matmul_blocks_bwd(m, implementation, interpret, residuals, dy):
  del implementation, interpret  # The backward is the XLA path for both.
  x, values, meta, columns = residuals
  groups = values.shape[2]
  dx_pad, dvalues = matmul_xla.matmul_blocks_vjp(_pad_features(x, groups * m), values, meta,
                                                 columns, dy)
  return dx_pad[:, :x.shape[1]], dvalues, None, None


_matmul_blocks.defvjp(_matmul_blocks_fwd, _matmul_blocks_bwd)


def vnm_matmul(x: jax.Array, w: VNMWeight, *, implementation: str | None = None) -> jax.Array:
  """``x @ W`` for the (K, N) kernel W that ``w`` stores compressed.

  Args:
    x: (..., K) floating activations; the leading axes are tokens.
    w: a :class:`VNMWeight` of shape (K, N). Its values are cast to x's dtype.
    implementation: None (Pallas on a GPU, XLA elsewhere), "pallas" (the Pallas
      interpreter where there is no GPU) or "xla". A weight the Pallas kernel cannot
      take runs XLA, with a warning logged.

  Returns:
    (..., N) in x's dtype, accumulated in float32; equal to ``x @ decompress(w)`` up
    to the order of summation. Differentiable for x and ``w.values``.
  """
  if not isinstance(w, VNMWeight):
    raise TypeError(f"w must be a VNMWeight (vnm_jax.compress), got {type(w).__name__}.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating array, got dtype {x.dtype}.")
  k, n = w.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x must have shape (..., {k}) to match w of shape {w.shape}, got "
                     f"{x.shape}.")
  used = resolve_implementation(implementation, w, x.dtype)
  leading = x.shape[:-1]
  x2 = x.reshape(-1, k)
  if x2.shape[0] == 0:
    return jnp.zeros((*leading, n), x.dtype)
  interpret = jax.default_backend() != "gpu"
  y = _matmul_blocks(x2, w.values.astype(x.dtype), w.meta, w.columns, w.config.m, used,
                     interpret)
  y = y[:, w.output_index] if w.output_index is not None else y[:, :n]
  return y.reshape(*leading, n)
