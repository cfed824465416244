"""``vnm_matmul(x, w, implementation=None)``: ``y = x @ W`` for a compressed V:N:M weight.

The one public op, in the tokamax manner: ``implementation`` None | "pallas" | "xla"
(:func:`~vnm_jax.ops.vnm_matmul.prepared.resolve_implementation`); the XLA
implementation (:mod:`~vnm_jax.ops.vnm_matmul.xla`) is the reference and the fallback
that always works; a weight the Pallas kernels cannot take runs XLA, with a warning.
Which formulation runs is picked per call from the token count
(:mod:`~vnm_jax.ops.vnm_matmul.dispatch`).

Two kinds of weight:

- a :class:`~vnm_jax.ops.vnm_matmul.prepared.PreparedVNMWeight` (:func:`prepare`,
  ``convert_to_vnm`` and the layers make them): the call runs the kernel on the
  prepared layout and no XLA op on the weight. Differentiable for x only: the layout
  is a cache of the stored values, so differentiating the weight raises (use the
  VNMWeight path to fine-tune).
- a :class:`~vnm_jax.format.VNMWeight`: prepared on the fly inside the call, which
  costs a pass over the weight every call (for XLA: building the condensed weight,
  4/M of the dense elements; on CPU that alone costs about one dense matmul at one
  token). Differentiable for x and ``w.values`` (a ``custom_vjp`` whose backward is
  the XLA path), so a compressed model can be fine-tuned directly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from vnm_jax.format import VNMWeight
from vnm_jax.masks import check_kernel_shape
from vnm_jax.ops.vnm_matmul import dispatch, pallas_decode, pallas_prefill, xla
from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS
from vnm_jax.ops.vnm_matmul.prepared import (PallasLayouts, PreparedVNMWeight, build_layout,
                                             check_implementation, resolve_implementation)

PERTURBED_PREPARED_MSG = (
    "vnm_matmul: differentiating a PreparedVNMWeight's arrays is not supported: its layout "
    "is a cache of the stored values, so a gradient step on them would leave it stale. "
    "Differentiate a VNMWeight (prepared.weight) instead, or build the layers with "
    "prepare=False to fine-tune a compressed model.")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static part of one call: what runs, for which layout."""

  implementation: str  # "xla" | "pallas"
  kernel: str  # xla: "batched" | "blocks"; pallas: "decode" | "prefill"
  m: int
  blocks_per_step: int = 0
  interpret: bool = False


def _plan(implementation: str, tokens: int, config, shape) -> _Plan:
  if implementation == "xla":
    k, n = shape
    condensed_rows = -(-n // config.v) * KEPT_COLUMNS * -(-k // config.m)
    choice = dispatch.choose_xla(tokens, condensed_rows)
    return _Plan("xla", choice.formulation, config.m, choice.blocks_per_step)
  kernel = dispatch.choose_pallas(tokens, config)
  return _Plan("pallas", kernel, config.m, interpret=jax.default_backend() != "gpu")


def _pad_features(x: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def _run(plan: _Plan, x: jax.Array, layout) -> jax.Array:
  """(T, K) x and a layout in x's dtype -> y_blocks (T, R*V) in x's dtype."""
  if plan.implementation == "xla":
    x_pad = _pad_features(x, layout.columns.shape[1] // 4 * plan.m)
    if plan.kernel == "batched":
      return xla.matmul_batched(x_pad, layout.condensed, layout.columns)
    return xla.matmul_blocks(x_pad, layout.condensed, layout.columns,
                             blocks_per_step=plan.blocks_per_step)
  if plan.kernel == "prefill" and layout.prefill is not None:
    return pallas_prefill.matmul(x, layout.prefill, m=plan.m, interpret=plan.interpret)
  return pallas_decode.matmul(x, layout.decode, m=plan.m, interpret=plan.interpret)


def _backward(plan: _Plan, x, weight_arrays, dy, with_values: bool):
  values, meta, columns = weight_arrays
  x_pad = _pad_features(x, values.shape[2] * plan.m)
  dx_pad, dvalues = xla.matmul_blocks_vjp(x_pad, values, meta, columns, dy,
                                          with_values=with_values)
  return dx_pad[:, :x.shape[1]], dvalues


# The VNMWeight path: the layout is built inside the forward from the stored arrays.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_stored(plan: _Plan, x, values, meta, columns):
  layout = build_layout(values, meta, columns, m=plan.m, implementation=plan.implementation,
                        dtype=x.dtype, kernels=(plan.kernel,))
  return _run(plan, x, layout)


def _matmul_stored_fwd(plan, x, values, meta, columns):
  return _matmul_stored(plan, x, values, meta, columns), (x, values, meta, columns)


def _matmul_stored_bwd(plan, residuals, dy):
  x, values, meta, columns = residuals
  dx, dvalues = _backward(plan, x, (values, meta, columns), dy, with_values=True)
  return dx, dvalues, None, None


_matmul_stored.defvjp(_matmul_stored_fwd, _matmul_stored_bwd)


# The prepared path: the forward reads only the layout; x is the one differentiable input.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_prepared(plan: _Plan, x, prepared: PreparedVNMWeight):
  return _run(plan, x, prepared.layout)


def _unwrap(tree):
  return jax.tree.map(lambda a: a.value, tree, is_leaf=lambda a: hasattr(a, "perturbed"))


def _matmul_prepared_fwd(plan, x, prepared):
  if any(getattr(leaf, "perturbed", False) for leaf in jax.tree.leaves(
      prepared, is_leaf=lambda a: hasattr(a, "perturbed"))):
    raise ValueError(PERTURBED_PREPARED_MSG)
  x, prepared = _unwrap(x), _unwrap(prepared)
  # The stored weight is read back from the layout in the backward pass only.
  return _run(plan, x, prepared.layout), (x, prepared)


def _matmul_prepared_bwd(plan, residuals, dy):
  x, prepared = residuals
  zero_weight = jax.tree.map(lambda _: None, prepared)
  if isinstance(dy, SymbolicZero):
    return jnp.zeros(x.shape, x.dtype), zero_weight
  w = prepared.weight
  dx, _ = _backward(plan, x, (w.values.astype(x.dtype), w.meta, w.columns), dy,
                    with_values=False)
  return dx, zero_weight


_matmul_prepared.defvjp(_matmul_prepared_fwd, _matmul_prepared_bwd, symbolic_zeros=True)


def _cast_layout(layout, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                      else a, layout)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _vnm_matmul(x: jax.Array, w, implementation: str) -> jax.Array:
  k, n = w.shape
  leading = x.shape[:-1]
  x2 = x.reshape(-1, k)
  tokens = x2.shape[0]
  if tokens == 0:
    return jnp.zeros((*leading, n), x.dtype)
  plan = _plan(implementation, tokens, w.config, w.shape)
  if isinstance(w, PreparedVNMWeight):
    if w.dtype != x.dtype:  # A pass over the layout every call: prepare in x's dtype.
      w = dataclasses.replace(w, layout=_cast_layout(w.layout, x.dtype))
    y = _matmul_prepared(plan, x2, w)
  else:
    y = _matmul_stored(plan, x2, w.values, w.meta, w.columns)
  y = y[:, w.output_index] if w.output_index is not None else y[:, :n]
  return y.reshape(*leading, n)


def vnm_matmul(x: jax.Array, w: VNMWeight | PreparedVNMWeight, *,
               implementation: str | None = None) -> jax.Array:
  """``x @ W`` for the (K, N) kernel W that ``w`` stores compressed.

  Args:
    x: (..., K) floating activations; the leading axes are tokens.
    w: a :class:`~vnm_jax.ops.vnm_matmul.prepared.PreparedVNMWeight` (the fast path:
      no op on the weight per call) or a :class:`~vnm_jax.format.VNMWeight` (prepared
      on the fly every call; see the module docstring for the cost).
    implementation: None (a prepared weight's own; else Pallas on a GPU, XLA
      elsewhere), "pallas" (the Pallas interpreter where there is no GPU) or "xla". A
      prepared weight asked for another implementation than its own is prepared again
      on the fly, from its stored weight.

  Returns:
    (..., N) in x's dtype, accumulated in float32; equal to ``x @ decompress(w)`` up
    to the order of summation.

  Raises:
    TypeError: ``w`` is not a (prepared) VNMWeight, or x is not floating.
    ValueError: x's last axis is not K, or ``implementation`` is unknown.
  """
  if not isinstance(w, (VNMWeight, PreparedVNMWeight)):
    raise TypeError(f"w must be a VNMWeight (vnm_jax.compress) or a PreparedVNMWeight "
                    f"(vnm_jax.prepare), got {type(w).__name__}.")
  check_implementation(implementation)
  check_kernel_shape(w.shape, "w.shape")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating array, got dtype {x.dtype}.")
  k, _ = w.shape
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x must have shape (..., {k}) to match w of shape {w.shape}, got "
                     f"{x.shape}.")
  if isinstance(w, PreparedVNMWeight):
    if implementation is not None and implementation != w.implementation:
      w = w.weight
    else:
      return _vnm_matmul(x, w, w.implementation)
  return _vnm_matmul(x, w, resolve_implementation(implementation, w.config, x.dtype))
