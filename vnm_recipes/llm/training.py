"""Three-stage LoRA of a Llama on reparametrised kernels, then the merge that keeps V:N:M.

`three_stage_lora` recomputes masks from |W + s*a@b|. To recompute Wanda masks (and
masks in permuted channel order) instead, the frozen kernels are stored as
`permute(W * n[:, None])` (`Reparametrisation`), where n are the kernel's calibration
input norms divided by their mean: the magnitude of the stored kernel is then the Wanda
score of the effective one, and the forward maps back exactly with
`unpermute(.) / n[:, None]`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import vnm_jax
from vnm_jax import Permutation, VNMConfig, path_str
from vnm_recipes.data.text import training_batch
from vnm_recipes.llm.evaluation import token_nll
from vnm_recipes.llm.presets import LoRASettings
from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama


class Reparametrisation:
  """Maps between a model's kernels and the stored kernels LoRA trains on.

  stored = permute(W * n[:, None], p) for every prunable kernel, where n are its
  calibration input norms over their mean (ones for magnitude masks) and p its channel
  permutation (identity without one); other leaves are stored as they are.
  """

  def __init__(self, scales: dict[str, jax.Array], permutations: dict[str, Permutation] | None):
    self.scales = scales
    self.permutations = permutations or {}

  def _scale(self, params, fn):
    def leaf(key_path, x):
      path = path_str(key_path)
      return fn(x, self.scales[path][:, None].astype(x.dtype)) if path in self.scales else x
    return jax.tree_util.tree_map_with_path(leaf, params)

  def to_stored(self, params):
    return vnm_jax.tree_permute(self._scale(params, jnp.multiply), self.permutations)

  def to_model(self, stored):
    return self._scale(vnm_jax.tree_unpermute(stored, self.permutations), jnp.divide)

  def masks_to_model(self, masks):
    """Masks of the stored kernels (a masks tree or {path: mask}) in model coordinates."""
    return vnm_jax.tree_unpermute(masks, self.permutations)


def lora_scales(params, mask_score: str, input_norms: dict | None) -> dict[str, jax.Array]:
  """{path: (in,) float32 row scales} of the prunable kernels for `Reparametrisation`."""
  scales = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(key_path)
    if not re.search(PRUNABLE_PATTERN, path):
      continue
    if mask_score == "magnitude":
      scales[path] = jnp.ones(leaf.shape[0], jnp.float32)
    else:
      norms = jnp.asarray(input_norms[path], jnp.float32)
      # Dividing by n must undo the scaling: keep n away from 0 (an input that never fires).
      norms = jnp.maximum(norms, 1e-6 * jnp.max(norms))
      scales[path] = norms / jnp.mean(norms)
  return scales


@dataclasses.dataclass
class LoRAResult:
  """What `train_three_stage_lora` returns.

  Attributes:
    params: the merged model params, (W + s*a@b) * mask on the prunable kernels.
    masks: {path: bool (in, out) mask} of every prunable kernel, in model coordinates.
    permutations: {path: Permutation} the masks are V:N:M under (None: identity).
    losses: training loss of every step.
    seconds: wall time of the training loop (compilation included).
    tokens: training tokens seen.
  """

  params: Any
  masks: dict[str, jax.Array]
  permutations: dict[str, Permutation] | None
  losses: list[float]
  seconds: float
  tokens: int


def train_three_stage_lora(model: Llama, train_tokens: np.ndarray, config: VNMConfig,
                           settings: LoRASettings, *, input_norms: dict | None = None,
                           permutations: dict[str, Permutation] | None = None,
                           progress: bool = True) -> LoRAResult:
  """Three-stage LoRA on the training split, then the merge that keeps V:N:M.

  Args:
    model: the dense model (not modified).
    train_tokens: 1D int training split.
    config: the V:N:M pattern of every prunable kernel.
    settings: the run (see `LoRASettings`).
    input_norms: {path: (in,) calibration input norms}; needed when
      settings.mask_score == "wanda".
    permutations: {path: Permutation} the masks are formed under (e.g. from a search on the
      one-shot scores); None keeps the channel order.
    progress: show a progress bar with the loss and stage.
  """
  if settings.mask_score == "wanda" and input_norms is None:
    raise ValueError("input_norms is required for settings.mask_score='wanda' (collect them "
                     "with vnm_jax.calibration.collect_input_norms)")
  if len(train_tokens) < settings.sequence_length:
    raise ValueError(f"settings.sequence_length={settings.sequence_length} exceeds the "
                     f"{len(train_tokens)} training tokens")
  graphdef, params = nnx.split(model)
  reparam = Reparametrisation(lora_scales(params, settings.mask_score, input_norms),
                              permutations)
  base = reparam.to_stored(params)
  adapters = vnm_jax.init_lora(jax.random.key(settings.seed), base, rank=settings.rank,
                               alpha=settings.alpha, filter=PRUNABLE_PATTERN)
  configs = vnm_jax.tree_configs(base, config, filter=PRUNABLE_PATTERN)
  dense_steps, dynamic_steps = settings.stage_steps()
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, max(1, settings.steps // 10), settings.steps,
      end_value=0.1 * settings.learning_rate)
  tx = vnm_jax.three_stage_lora(
      optax.adamw(schedule, weight_decay=settings.weight_decay), configs,
      total_steps=settings.steps, dense_steps=dense_steps, dynamic_steps=dynamic_steps,
      update_every=settings.update_every, regularization=settings.regularization)
  opt_state = tx.init(adapters)

  @jax.jit
  def train_step(base, adapters, opt_state, tokens):
    def loss_fn(adapters):
      effective = reparam.to_model(vnm_jax.lora_params(base, adapters, opt_state))
      return jnp.mean(token_nll(nnx.merge(graphdef, effective)(tokens), tokens))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
    return optax.apply_updates(adapters, updates), opt_state, loss

  rng = np.random.default_rng(settings.seed)
  losses = []
  start = time.perf_counter()
  bar = tqdm(range(settings.steps), desc=f"LoRA {config}", disable=not progress)
  for _ in bar:
    batch = training_batch(train_tokens, rng, settings.batch_size, settings.sequence_length)
    adapters, opt_state, loss = train_step(base, adapters, opt_state, jnp.asarray(batch))
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}", stage=int(opt_state.stage))
  seconds = time.perf_counter() - start
  merged = reparam.to_model(vnm_jax.merge_lora(base, adapters, opt_state))
  # Masked entries of the merge are exact zeros, and stay zero through unpermute and 1/n.
  masks = vnm_jax.leaves_by_path(reparam.masks_to_model(vnm_jax.lora_masks(opt_state)))
  merged = vnm_jax.tree_apply_masks(merged, masks)
  return LoRAResult(params=merged, masks=masks, permutations=permutations, losses=losses,
                    seconds=seconds,
                    tokens=settings.steps * settings.batch_size * settings.sequence_length)
