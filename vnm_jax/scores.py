"""Importance scores of a Flax kernel's entries: which weights a V:N:M mask should keep.

All scores are for a 2D Flax kernel ``W`` of shape (in_features, out_features) = (K, N):
``W[j, i]`` connects input feature j (axis 0, the reduction axis) to output feature i
(axis 1). Activation-aware scores take ``input_norms`` of shape (K,):
``input_norms[j] = ||X_j||_2``, the L2 norm of input feature j over all calibration
tokens (see :func:`vnm_jax.calibration.collect_input_norms`). A kernel with more dims
is scored on its 2D view (:func:`vnm_jax.masks.as_matrix`), where j is the flattened
contraction index.

Every score is a pure jnp function (jittable) that returns float32 (or wider) values,
>= 0, of the kernel's shape. Shapes are checked always; NaN and negative values only
outside jit, where the values are known.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.masks import as_array, check_kernel_shape


# A score callable: (kernel_2d (K, N), input_norms (K,) or None) -> scores (K, N).
ScoreFn = Callable[[jax.Array, "jax.Array | None"], jax.Array]


class Importance(enum.Enum):
  """The built-in importance scores, by name.

  MAGNITUDE: ``|W|``. WANDA: ``|W[j, i]| * ||X_j||`` (Sun et al. 2023). RIA: relative
  importance and activations (Zhang et al. 2024), see :func:`ria_score`.
  """

  MAGNITUDE = "magnitude"
  WANDA = "wanda"
  RIA = "ria"

  @property
  def needs_input_norms(self) -> bool:
    """Whether the score multiplies by calibration activation norms."""
    return self is not Importance.MAGNITUDE

  @classmethod
  def parse(cls, value: Importance | str) -> Importance:
    """An Importance from itself or its name ("magnitude", "wanda", "ria")."""
    if isinstance(value, cls):
      return value
    allowed = [member.value for member in cls]
    if not isinstance(value, str):
      raise TypeError(f"score must be an Importance, one of {allowed} or a callable, got "
                      f"{value!r} ({type(value).__name__}).")
    try:
      return cls(value.lower())
    except ValueError:
      raise ValueError(f"score must be one of {allowed} (or an Importance or a callable), "
                       f"got {value!r}.") from None


def _float(x: jax.Array) -> jax.Array:
  # Scores are compared and summed over blocks; bf16 would create ties and rounding.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_kernel(kernel, *, ndim: int | None) -> jax.Array:
  kernel = as_array(kernel)
  if ndim is not None:
    check_kernel_shape(kernel.shape, ndim=ndim)
  elif kernel.size == 0:
    raise ValueError(f"kernel has a zero-size dimension: shape {kernel.shape}.")
  if not isinstance(kernel, jax.core.Tracer):
    bad = int(jnp.sum(~jnp.isfinite(kernel)))
    if bad:
      raise ValueError(f"kernel contains {bad} NaN or infinite entries; scores need a finite "
                       f"kernel.")
  return kernel


def _check_input_norms(input_norms, kernel: jax.Array) -> jax.Array:
  if input_norms is None:
    raise ValueError("input_norms is required: per-input-feature L2 norms ||X_j|| of shape "
                     f"({kernel.shape[0]},), e.g. from vnm_jax.calibration.collect_input_norms.")
  input_norms = jnp.asarray(input_norms)
  if input_norms.shape != (kernel.shape[0],):
    raise ValueError(f"input_norms must have shape (in_features,) = ({kernel.shape[0]},) for a "
                     f"kernel of shape {kernel.shape} (axis 0 is the input), got "
                     f"{input_norms.shape}.")
  if not jnp.issubdtype(input_norms.dtype, jnp.floating):
    input_norms = input_norms.astype(jnp.float32)
  if not isinstance(input_norms, jax.core.Tracer):
    # numpy, not jnp: inside a jit trace, jnp ops on a concrete constant give tracers.
    values = np.asarray(input_norms)
    bad = int(np.sum(~np.isfinite(values)))
    if bad:
      raise ValueError(f"input_norms contains {bad} NaN or infinite entries; activation norms "
                       f"must be finite.")
    if bool(np.any(values < 0)):
      raise ValueError(f"input_norms contains negative entries (min "
                       f"{float(values.min()):.4g}); L2 norms are >= 0.")
  return input_norms


def magnitude_score(kernel: jax.Array) -> jax.Array:
  """``|kernel|`` as float32 (or wider); any shape."""
  return jnp.abs(_float(_check_kernel(kernel, ndim=None)))


def wanda_score(kernel: jax.Array, input_norms: jax.Array) -> jax.Array:
  """Wanda: ``score[j, i] = |W[j, i]| * ||X_j||_2``.

  Args:
    kernel: (in_features, out_features) = (K, N).
    input_norms: (K,), L2 norm of each input feature over the calibration tokens.

  Returns:
    (K, N) float32 (or wider) scores.
  """
  kernel = _check_kernel(kernel, ndim=2)
  input_norms = _check_input_norms(input_norms, kernel)
  return jnp.abs(_float(kernel)) * _float(input_norms)[:, None]


def ria_score(kernel: jax.Array, input_norms: jax.Array, *, a: float = 0.5) -> jax.Array:
  """RIA (relative importance and activations) for a Flax kernel.

  The spec writes RIA for a PyTorch (out, in) weight ``M`` as
  ``(|M_ij| / sum_k |M_kj| + |M_ij| / sum_k |M_ik|) * ||X_j||^a`` with j the input.
  For the Flax kernel ``W = M.T`` of shape (K, N) = (in, out), entry ``W[j, i]``:

    score[j, i] = (|W[j, i]| / sum_i' |W[j, i']|      # over all outputs fed by input j (axis 1)
                 + |W[j, i]| / sum_j' |W[j', i]|)     # over all inputs of output i (axis 0)
                  * input_norms[j] ** a

  A row or column of zeros contributes 0 (not 0/0).

  Args:
    kernel: (in_features, out_features) = (K, N).
    input_norms: (K,), L2 norm of each input feature over the calibration tokens.
    a: exponent of the activation term, finite and >= 0; the RIA paper uses 0.5.

  Returns:
    (K, N) float32 (or wider) scores.
  """
  kernel = _check_kernel(kernel, ndim=2)
  input_norms = _check_input_norms(input_norms, kernel)
  if isinstance(a, bool) or not isinstance(a, (int, float, np.floating, np.integer)) \
      or not np.isfinite(a) or a < 0:
    raise ValueError(f"a (the RIA activation exponent) must be a finite number >= 0, got {a!r}.")
  magnitude = jnp.abs(_float(kernel))
  per_input = magnitude.sum(axis=1, keepdims=True)  # (K, 1): over outputs, fixed input j
  per_output = magnitude.sum(axis=0, keepdims=True)  # (1, N): over inputs, fixed output i
  # Where a sum is 0 every term in it is 0, so dividing by 1 there gives the intended 0.
  relative = (magnitude / jnp.where(per_input == 0, 1, per_input)
              + magnitude / jnp.where(per_output == 0, 1, per_output))
  return relative * (_float(input_norms) ** a)[:, None]


def importance_scores(kernel: jax.Array, importance: Importance | str,
                      input_norms: jax.Array | None = None) -> jax.Array:
  """A built-in score by name: magnitude ignores ``input_norms``; wanda and ria need them.

  RIA uses its default ``a=0.5``; for another exponent call :func:`ria_score` directly
  (or pass ``functools.partial(ria_score, a=...)`` where a score callable is accepted).
  """
  importance = Importance.parse(importance)
  if importance is Importance.MAGNITUDE:
    return magnitude_score(kernel)
  if importance is Importance.WANDA:
    return wanda_score(kernel, input_norms)
  return ria_score(kernel, input_norms)


def score_function(score: Importance | str | ScoreFn) -> tuple[ScoreFn, Importance | None]:
  """``(fn, importance)`` of a ``score=`` argument: a built-in name or a callable.

  ``fn(kernel_2d, input_norms_or_None) -> scores_2d``; ``importance`` is the parsed
  :class:`Importance` for a built-in score and None for a callable.

  Raises:
    TypeError/ValueError: ``score`` is neither an Importance, one of its names, nor
      a callable.
  """
  if callable(score) and not isinstance(score, (str, Importance)):
    return score, None
  importance = Importance.parse(score)
  return (lambda matrix, norms: importance_scores(matrix, importance, norms)), importance
