"""Channel permutations of a Flax kernel (in_features, out_features).

:class:`Permutation` orders a kernel's input and output channels; :func:`permute` and
:func:`unpermute` apply it, :func:`validate_permutation` checks it against a shape, and
:func:`fold_output_permutation` moves an output order into the next layer's input rows
so the producer needs no output un-permute. Searching a permutation is
:mod:`vnm_jax.permutation_search`.
"""

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


# ----------------------------------------------------------------------------------
# Folding an output permutation into the next layer


class FoldedPair(NamedTuple):
  """A producer/consumer pair with the producer's output order folded into both.

  Attributes:
    producer: ``producer[:, outputs]``: its natural output order is now the order
      the search grouped, so it prunes and compresses with ``producer_permutation``
      and needs no output un-permute.
    consumer: the consumer with its input rows reordered to match.
    producer_permutation: ``Permutation(permutation.inputs, None)``.
    consumer_permutation: the consumer's own permutation (if one was given) in the
      new row order.
    producer_bias: ``bias[outputs]`` or None.
    siblings: the sibling kernels (e.g. a SwiGLU gate) with their outputs reordered alike.
  """

  producer: jax.Array
  consumer: jax.Array
  producer_permutation: Permutation
  consumer_permutation: Permutation | None
  producer_bias: jax.Array | None
  siblings: tuple[jax.Array, ...]


def fold_output_permutation(producer, consumer, permutation: Permutation, *,
                            producer_bias=None, siblings=(),
                            consumer_permutation: Permutation | None = None,
                            head_dim: int | None = None, query_groups: int = 1) -> FoldedPair:
  """Moves a producer's output permutation into the consumer's input rows.

  For a pair ``y = consumer_fn(f(x @ producer + bias))`` in which the producer's
  output features reach the consumer's input rows one to one through per-feature
  operations only (activations, a bias, the SwiGLU product, attention's token mixing
  within a head), reordering those features in both kernels leaves the function
  unchanged. After the fold, the producer's V:N:M mask with
  ``producer_permutation`` equals the original mask with ``permutation`` with its
  columns reordered, and ``compress`` stores no ``output_index``.

  - MLP (up -> down): pass the up kernel and the down kernel; a bias of the up layer
    as ``producer_bias``.
  - SwiGLU ``down(silu(gate(x)) * up(x))``: the gate and up outputs are multiplied
    feature by feature, so both must use the same output order for the fold to be
    valid: search one of them (e.g. up), give the other as a sibling here, and prune
    the sibling with ``Permutation(its own inputs, None)`` on its folded kernel (find
    its input order with ``find_permutation(folded_gate, cfg, search_outputs=False)``).
  - Attention (v -> o): attention weights are per head, so the fold is valid only
    when ``permutation.outputs`` keeps every head's features inside that head; give
    ``head_dim`` to have it checked. With grouped-query attention (each key/value
    head serves ``query_groups`` query heads), o's input rows of every query head in
    a group are reordered like their key/value head.

  Args:
    producer: (K, N) kernel whose outputs were permuted.
    consumer: (N * query_groups, P) kernel reading those outputs.
    permutation: the producer's Permutation (its ``outputs`` is folded).
    producer_bias: (N,) bias of the producer, or None.
    siblings: (K', N) kernels whose outputs meet the producer's feature by feature.
    consumer_permutation: the consumer's own Permutation (found on the unfolded
      consumer), returned in the folded row order.
    head_dim: features per attention head, to check the permutation keeps heads.
    query_groups: query heads per key/value head (grouped-query attention).

  Returns:
    A :class:`FoldedPair`.
  """
  producer = jnp.asarray(producer)
  consumer = jnp.asarray(consumer)
  if producer.ndim != 2 or consumer.ndim != 2:
    raise ValueError(f"producer and consumer must be 2D (in, out) kernels, got shapes "
                     f"{producer.shape} and {consumer.shape}.")
  validate_permutation(permutation, producer.shape)
  if permutation is None:
    raise ValueError("permutation is None: there is no output permutation to fold.")
  n = producer.shape[1]
  if isinstance(query_groups, bool) or not isinstance(query_groups, int) or query_groups < 1:
    raise ValueError(f"query_groups must be a positive int, got {query_groups!r}.")
  if consumer.shape[0] != n * query_groups:
    raise ValueError(f"consumer must have {n * query_groups} input rows (producer outputs {n} "
                     f"x query_groups {query_groups}), got shape {consumer.shape}.")
  outputs = (np.arange(n) if permutation.outputs is None
             else np.asarray(permutation.outputs, np.intp))
  if head_dim is not None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1 \
        or n % head_dim:
      raise ValueError(f"head_dim must be a positive int dividing the producer's {n} outputs, "
                       f"got {head_dim!r}.")
    moved = np.flatnonzero(outputs // head_dim != np.arange(n) // head_dim)
    if len(moved):
      raise ValueError(f"permutation.outputs moves features across attention heads (e.g. "
                       f"position {moved[0]} takes feature {outputs[moved[0]]} with head_dim "
                       f"{head_dim}); attention weights are per head, so the fold would change "
                       f"the function. Search with search_outputs=False or keep heads intact.")
  elif query_groups > 1:
    raise ValueError("query_groups > 1 needs head_dim (features per head) to map key/value "
                     "features to query heads.")
  if query_groups > 1:
    heads = n // head_dim
    within = (outputs % head_dim).reshape(heads, head_dim)  # per kv head, new -> old
    query_rows = np.arange(heads * query_groups)[:, None] * head_dim
    consumer_order = (query_rows + within.repeat(query_groups, axis=0)).ravel()
  else:
    consumer_order = outputs
  if producer_bias is not None:
    producer_bias = jnp.asarray(producer_bias)
    if producer_bias.shape != (n,):
      raise ValueError(f"producer_bias must have shape ({n},), got {producer_bias.shape}.")
    producer_bias = producer_bias[outputs]
  folded_siblings = []
  for index, sibling in enumerate(siblings):
    sibling = jnp.asarray(sibling)
    if sibling.ndim != 2 or sibling.shape[1] != n:
      raise ValueError(f"siblings[{index}] must be a 2D kernel with {n} outputs, got shape "
                       f"{sibling.shape}.")
    folded_siblings.append(sibling[:, outputs])
  if consumer_permutation is not None:
    validate_permutation(consumer_permutation, consumer.shape)
    if consumer_permutation.inputs is not None:
      new_position = np.argsort(consumer_order)
      consumer_permutation = Permutation(
          new_position[np.asarray(consumer_permutation.inputs)].astype(np.int32),
          consumer_permutation.outputs)
  return FoldedPair(producer=producer[:, outputs], consumer=consumer[consumer_order],
                    producer_permutation=Permutation(permutation.inputs, None),
                    consumer_permutation=consumer_permutation, producer_bias=producer_bias,
                    siblings=tuple(folded_siblings))
