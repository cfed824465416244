"""Per-layer V:N:M allocation for a Llama: measured sensitivities, then `vnm_jax.allocate_configs`.

The sensitivity of a kernel to a config is the loss increase on a calibration batch when
that kernel alone is pruned with that config (one-shot masks from the run's importance
score, e.g. Wanda with the calibration input norms) and every other weight is dense. The
allocation then picks a config per kernel that minimises the summed sensitivity at a given
average density (`vnm_jax.allocate_configs`).

Cost: one forward pass of the calibration batch per (kernel, candidate): 210 kernels x 4
candidates = 840 passes for SmolLM2-135M (minutes on 2 CPU cores at 256 tokens; seconds on
a GPU). Only the pruned leaf changes between passes, so one compiled program serves all.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import vnm_jax
from vnm_jax import VNMConfig
from vnm_recipes.llm.evaluation import token_nll
from vnm_recipes.models.llama import PRUNABLE_PATTERN


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _mean_nll(graphdef, state, tokens):
  return jnp.mean(token_nll(nnx.merge(graphdef, state)(tokens), tokens))


def _pruned(kernel, norms, config, score):
  # Eager: one compile per (shape, config) would cost more than the few hundred calls save.
  scores = vnm_jax.importance_scores(kernel, score, norms)
  mask = vnm_jax.vnm_mask(kernel, config, scores=scores)
  return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))


def kernel_sensitivities(model: nnx.Module, tokens: np.ndarray,
                         candidates: Sequence[VNMConfig | str], *,
                         input_norms: Mapping[str, jax.Array] | None = None,
                         score: str = "wanda",
                         progress: bool = True) -> dict[str, dict[str, float]]:
  """Calibration loss increase from pruning each prunable kernel alone with each candidate.

  Args:
    model: the dense Llama.
    tokens: int (batch, length) calibration tokens.
    candidates: the configs to measure, e.g. ("64:2:4", "64:2:5", "64:2:6", "64:2:8").
    input_norms: {path: (in,) norms}; needed by the "wanda" and "ria" scores.
    score: the one-shot importance ("magnitude", "wanda", "ria").
    progress: show a progress bar.

  Returns:
    ``{path: {str(config): mean NLL with the kernel pruned - dense mean NLL}}``.
  """
  configs = [VNMConfig.parse(c) for c in candidates]
  importance = vnm_jax.Importance.parse(score)
  if importance.needs_input_norms and input_norms is None:
    raise ValueError(f"score={score!r} needs input_norms (vnm_jax.collect_input_norms)")
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  tokens = jnp.asarray(tokens, jnp.int32)
  dense = float(_mean_nll(graphdef, state, tokens))
  paths = [(i, vnm_jax.path_str(p)) for i, (p, _) in enumerate(leaves)]
  paths = [(i, p) for i, p in paths if np.ndim(leaves[i][1]) == 2
           and re.search(PRUNABLE_PATTERN, p)]
  values = [leaf for _, leaf in leaves]
  result: dict[str, dict[str, float]] = {}
  bar = tqdm(total=len(paths) * len(configs), desc="sensitivities", disable=not progress,
             mininterval=10.0)
  for index, path in paths:
    kernel = values[index]
    norms = None if input_norms is None else jnp.asarray(input_norms[path], jnp.float32)
    result[path] = {}
    for config in configs:
      changed = list(values)
      changed[index] = _pruned(kernel, norms, config, importance.value)
      loss = _mean_nll(graphdef, treedef.unflatten(changed), tokens)
      result[path][str(config)] = float(loss) - dense
      bar.update()
  bar.close()
  return result


def kernel_shapes(params) -> dict[str, tuple[int, int]]:
  """{path: (in, out)} of the prunable kernels of a Llama's state."""
  return {path: tuple(int(d) for d in np.shape(leaf))
          for path, leaf in vnm_jax.leaves_by_path(params).items()
          if np.ndim(leaf) == 2 and re.search(PRUNABLE_PATTERN, path)}


def allocate(sensitivities: Mapping[str, Mapping[str, float]], shapes: Mapping[str, tuple],
             density: float | VNMConfig | str) -> dict[str, VNMConfig]:
  """`vnm_jax.allocate_configs` at an average density (a number or a uniform config's)."""
  return vnm_jax.allocate_configs(sensitivities, {p: shapes[p] for p in sensitivities},
                                  density=density)
