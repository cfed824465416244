"""Channel permutations of a Flax kernel (in_features, out_features)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Permutation(NamedTuple):
  """Orderings of a 2D kernel's input and output channels.

  The permuted kernel is ``kernel[inputs][:, outputs]``: V:N:M groups are formed
  over that order, so rows ``outputs[j*V:(j+1)*V]`` share a V block and inputs
  ``inputs[g*M:(g+1)*M]`` share an M group.

  Attributes:
    inputs: int array (in_features,), an ordering of axis 0, or None (identity).
    outputs: int array (out_features,), an ordering of axis 1, or None (identity).
  """

  inputs: jax.Array | np.ndarray | None = None
  outputs: jax.Array | np.ndarray | None = None


def _check_ordering(name: str, order, length: int) -> None:
  if order is None:
    return
  if not (jnp.issubdtype(jnp.asarray(order).dtype, jnp.integer)):
    raise TypeError(f"permutation.{name} must be an integer array, got dtype "
                    f"{jnp.asarray(order).dtype}.")
  if isinstance(order, jax.core.Tracer):
    if order.shape != (length,):
      raise ValueError(f"permutation.{name} must have shape ({length},), got {order.shape}.")
    return  # Values of a traced permutation cannot be checked here.
  values = np.asarray(order)
  if values.shape != (length,):
    raise ValueError(f"permutation.{name} must have shape ({length},) to match the kernel, "
                     f"got {values.shape}.")
  if not np.array_equal(np.sort(values), np.arange(length)):
    missing = np.setdiff1d(np.arange(length), values)[:5]
    raise ValueError(f"permutation.{name} is not a permutation of 0..{length - 1}: "
                     f"missing {missing.tolist()} (first 5 shown).")


def validate_permutation(permutation: Permutation | None, shape: tuple[int, int]) -> None:
  """Raises a clear error unless ``permutation`` fits a 2D kernel of ``shape`` (in, out)."""
  if permutation is None:
    return
  if not isinstance(permutation, Permutation):
    raise TypeError(f"permutation must be a vnm_jax.Permutation or None, got "
                    f"{type(permutation).__name__}.")
  _check_ordering("inputs", permutation.inputs, shape[0])
  _check_ordering("outputs", permutation.outputs, shape[1])


def inverse(order: jax.Array) -> jax.Array:
  """The inverse ordering: ``x[order][inverse(order)] == x``."""
  return jnp.argsort(jnp.asarray(order))


def permute(matrix: jax.Array, permutation: Permutation | None) -> jax.Array:
  """``matrix[inputs][:, outputs]`` (identity where a side is None)."""
  if permutation is None:
    return matrix
  if permutation.inputs is not None:
    matrix = matrix[jnp.asarray(permutation.inputs)]
  if permutation.outputs is not None:
    matrix = matrix[:, jnp.asarray(permutation.outputs)]
  return matrix


def unpermute(matrix: jax.Array, permutation: Permutation | None) -> jax.Array:
  """Inverse of :func:`permute`: back to original coordinates."""
  if permutation is None:
    return matrix
  if permutation.inputs is not None:
    matrix = matrix[inverse(permutation.inputs)]
  if permutation.outputs is not None:
    matrix = matrix[:, inverse(permutation.outputs)]
  return matrix
