"""Three-stage LoRA of a Llama, then the merge that keeps V:N:M.

The stage-2/3 masks are recomputed by `vnm_jax.three_stage_lora` itself, from W + s*a@b with
the run's importance (`LoRASettings.mask_score`: Wanda or RIA with the calibration input
norms, or magnitude) and, where given, each kernel's channel permutation. The model is
trained in its own coordinates: nothing is reparametrised.

Precision: `dtype` is the frozen base's dtype (`default_dtype`: bfloat16 on a GPU, float32 on
the CPU). The adapters and their optimizer state, the effective kernel's sum W + s*a@b, the
logits, the loss and the mask scores are float32 either way.

Devices: with several devices the step runs data-parallel under a one-axis
`jax.sharding.Mesh` ("data", `data_mesh`): each batch is split along its first axis; the base,
the adapters and the optimizer state are replicated; the mean over the batch becomes the
all-reduce XLA inserts, so every device applies the same update.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import vnm_jax
from vnm_jax import Permutation, VNMConfig
from vnm_jax.allocation import allocation_patterns
from vnm_recipes.data.text import training_batch
from vnm_recipes.llm.evaluation import token_nll
from vnm_recipes.llm.presets import LoRASettings
from vnm_recipes.models.llama import PRUNABLE_PATTERN, Llama

DATA_AXIS = "data"
LOG_EVERY = 10  # steps between progress-bar updates (each reads the loss from the device)


def default_dtype(backend: str | None = None) -> jnp.dtype:
  """bfloat16 on a GPU, float32 elsewhere (CPU matmuls are not faster in bf16)."""
  return jnp.dtype(jnp.bfloat16 if (backend or jax.default_backend()) == "gpu" else jnp.float32)


def cast_floats(tree: Any, dtype) -> Any:
  """Every floating leaf of ``tree`` in ``dtype``; other leaves unchanged."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def data_mesh(batch_size: int, devices: list | None = None) -> Mesh | None:
  """A one-axis ("data") mesh over the most devices that divide ``batch_size``.

  Returns None when that is a single device (a plain single-device step).
  """
  devices = list(jax.devices() if devices is None else devices)
  count = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
  if count == 1:
    return None
  return Mesh(np.asarray(devices[:count]), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def kernel_configs(params, config: VNMConfig | str | Mapping[str, VNMConfig | str]):
  """The configs tree of the prunable kernels: one config for all or ``{path: config}``."""
  if isinstance(config, Mapping):
    return vnm_jax.tree_configs(params, None, filter=PRUNABLE_PATTERN,
                                configs=allocation_patterns(config))
  return vnm_jax.tree_configs(params, config, filter=PRUNABLE_PATTERN)


@dataclasses.dataclass
class LoRAResult:
  """What `train_three_stage_lora` returns.

  Attributes:
    params: the merged model params, (W + s*a@b) * mask on the prunable kernels, in the
      training dtype.
    masks: {path: bool (in, out) mask} of every prunable kernel.
    configs: {path: VNMConfig} of every prunable kernel.
    permutations: {path: Permutation} the masks are V:N:M under (None: identity).
    losses: training loss of every step (float32).
    seconds: wall time of the training loop, compilation included.
    compile_seconds: wall time of the first step (compilation and one step).
    tokens: training tokens seen.
    devices: devices the step ran on (data-parallel when > 1).
    dtype: the base's dtype.
  """

  params: Any
  masks: dict[str, jax.Array]
  configs: dict[str, VNMConfig]
  permutations: dict[str, Permutation] | None
  losses: list[float]
  seconds: float
  compile_seconds: float
  tokens: int
  devices: int
  dtype: str


def _learning_rate(settings: LoRASettings) -> optax.Schedule:
  warmup = max(1, settings.steps // 10)
  return optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup,
                                            max(settings.steps, warmup + 1),
                                            end_value=0.1 * settings.learning_rate)


def train_three_stage_lora(model: Llama, train_tokens: np.ndarray,
                           config: VNMConfig | str | Mapping[str, VNMConfig | str],
                           settings: LoRASettings, *, input_norms: dict | None = None,
                           permutations: dict[str, Permutation] | None = None,
                           dtype=None, mesh: Mesh | None | str = "auto",
                           progress: bool = True) -> LoRAResult:
  """Three-stage LoRA on the training split, then the merge that keeps V:N:M.

  Args:
    model: the dense model (not modified).
    train_tokens: 1D int training split.
    config: the V:N:M pattern of every prunable kernel, or ``{path: config}`` per kernel
      (a per-layer allocation, `vnm_jax.allocate_configs`).
    settings: the run (see `LoRASettings`).
    input_norms: {path: (in,) calibration input norms}; needed by the "wanda" and "ria"
      mask scores.
    permutations: {path: Permutation} the masks are formed under (e.g. from a search on
      the one-shot scores); None keeps the channel order.
    dtype: the frozen base's dtype; None for `default_dtype()`.
    mesh: "auto" for `data_mesh(settings.batch_size)`, None for one device, or a Mesh
      with a "data" axis that divides the batch.
    progress: show a progress bar with the loss and stage.
  """
  if settings.mask_score != "magnitude" and input_norms is None:
    raise ValueError(f"input_norms is required for settings.mask_score="
                     f"{settings.mask_score!r} (collect them with vnm_jax.collect_input_norms)")
  if len(train_tokens) < settings.sequence_length:
    raise ValueError(f"settings.sequence_length={settings.sequence_length} exceeds the "
                     f"{len(train_tokens)} training tokens")
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh must be 'auto', None or a jax.sharding.Mesh, got {mesh!r}")
    mesh = data_mesh(settings.batch_size)
  if mesh is not None and settings.batch_size % mesh.shape[DATA_AXIS]:
    raise ValueError(f"settings.batch_size={settings.batch_size} must divide over the mesh's "
                     f"{mesh.shape[DATA_AXIS]} '{DATA_AXIS}' devices")
  dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
  graphdef, params = nnx.split(model)
  base = cast_floats(params, dtype)
  # Adapters (and so Adam's moments) stay float32 whatever the base's dtype.
  adapters = vnm_jax.init_lora(jax.random.key(settings.seed), base, rank=settings.rank,
                               alpha=settings.alpha, filter=PRUNABLE_PATTERN, dtype=jnp.float32)
  configs = kernel_configs(base, config)
  dense_steps, dynamic_steps = settings.stage_steps()
  tx = vnm_jax.three_stage_lora(
      optax.adamw(_learning_rate(settings), weight_decay=settings.weight_decay), configs,
      total_steps=settings.steps, dense_steps=dense_steps, dynamic_steps=dynamic_steps,
      update_every=settings.update_every, regularization=settings.regularization,
      score=settings.mask_score,
      input_norms=None if settings.mask_score == "magnitude" else input_norms,
      permutations=permutations)
  opt_state = tx.init(adapters)

  def train_step(base, adapters, opt_state, tokens):
    def loss_fn(adapters):
      effective = vnm_jax.lora_params(base, adapters, opt_state)
      return jnp.mean(token_nll(nnx.merge(graphdef, effective)(tokens), tokens))

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
    return optax.apply_updates(adapters, updates), opt_state, loss

  donate = (1, 2) if jax.default_backend() == "gpu" else ()
  if mesh is None:
    step_fn = jax.jit(train_step, donate_argnums=donate)
    batch_sharding = None
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    base, adapters, opt_state = jax.device_put((base, adapters, opt_state), replicated)
    step_fn = jax.jit(train_step, donate_argnums=donate,
                      out_shardings=(replicated, replicated, replicated))

  rng = np.random.default_rng(settings.seed)
  losses = []  # device scalars: reading each one would stall the device every step
  start = time.perf_counter()
  compile_seconds = math.nan
  bar = tqdm(range(settings.steps), desc=f"LoRA {_label(config)}", disable=not progress,
             mininterval=10.0)
  for step in bar:
    batch = training_batch(train_tokens, rng, settings.batch_size, settings.sequence_length)
    batch = jnp.asarray(batch) if batch_sharding is None else jax.device_put(batch,
                                                                             batch_sharding)
    adapters, opt_state, loss = step_fn(base, adapters, opt_state, batch)
    losses.append(loss)
    if step == 0:
      loss.block_until_ready()
      compile_seconds = time.perf_counter() - start
    if step % LOG_EVERY == 0 or step == settings.steps - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}", stage=int(opt_state.stage), refresh=False)
  losses = [float(x) for x in jax.device_get(losses)]
  seconds = time.perf_counter() - start
  merged = vnm_jax.merge_lora(base, adapters, opt_state)
  masks = vnm_jax.leaves_by_path(vnm_jax.lora_masks(opt_state))
  return LoRAResult(params=merged, masks=masks,
                    configs=vnm_jax.leaves_by_path(configs,
                                                   is_leaf=lambda x: isinstance(x, VNMConfig)),
                    permutations=permutations, losses=losses, seconds=seconds,
                    compile_seconds=compile_seconds,
                    tokens=settings.steps * settings.batch_size * settings.sequence_length,
                    devices=1 if mesh is None else mesh.shape[DATA_AXIS], dtype=str(dtype))


def _label(config) -> str:
  return "per-layer" if isinstance(config, Mapping) else str(VNMConfig.parse(config))
