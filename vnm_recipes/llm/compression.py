"""The compressed Llama: every pruned projection a `VNMLinear`, checked against the masked model."""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_jax import Permutation, VNMConfig, VNMLinear, convert_to_vnm
from vnm_jax.allocation import allocation_patterns
from vnm_recipes.models.llama import Llama


def compress_llama(model: Llama, config: VNMConfig | str | Mapping[str, VNMConfig | str],
                   masks: dict[str, jax.Array],
                   permutations: dict[str, Permutation] | None = None) -> Llama:
  """A copy of `model` whose masked projections are `vnm_jax.layers.VNMLinear` layers.

  Args:
    model: a Llama whose prunable kernels are already multiplied by their masks.
    config: the V:N:M pattern of the masks, or {path: config} per kernel (a per-layer
      allocation).
    masks: {path: bool (in, out) mask} of every prunable kernel (V:N:M after permutation).
    permutations: {path: Permutation} of the masks (None: identity).

  Returns:
    The compressed model (every pruned projection runs `vnm_matmul`); `model` is not
    modified.
  """
  if isinstance(config, Mapping):
    config = allocation_patterns(config)
  return convert_to_vnm(nnx.clone(model), masks, config, permutations=permutations)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def model_logits(model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
  """float32 numpy logits of int (batch, length) tokens (one compiled program per model)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jnp.asarray(tokens, jnp.int32)), np.float32)


def compression_check(masked_model: Llama, compressed_model: Llama,
                      tokens: np.ndarray) -> dict[str, float]:
  """Compares the logits of the compressed and the masked dense model on `tokens` (1, T).

  Returns:
    max_abs_diff, max_abs_logit, and argmax_agreement (share of positions whose top token
    agrees).
  """
  dense = model_logits(masked_model, tokens)
  sparse = model_logits(compressed_model, tokens)
  return {"max_abs_diff": float(np.max(np.abs(dense - sparse))),
          "max_abs_logit": float(np.max(np.abs(dense))),
          "argmax_agreement": float(np.mean(dense.argmax(-1) == sparse.argmax(-1)))}


def compressed_bytes(model: nnx.Module) -> tuple[int, int]:
  """(stored bytes, dense bytes) over the model's `VNMLinear` weights."""
  weights = [m.weight for _, m in nnx.iter_graph(model) if isinstance(m, VNMLinear)]
  return sum(w.nbytes for w in weights), sum(w.dense_nbytes for w in weights)
