"""Training a ViT on an image split: the optimiser, the augmentation, the dense and sparse steps."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import vnm_jax
from vnm_recipes.checks import check_positive_ints
from vnm_recipes.data.images import ImageSplit, iterate_batches
from vnm_recipes.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings of one training run.

  Attributes:
    epochs: passes over the training images.
    batch_size: images per step (the last partial batch of an epoch is dropped).
    learning_rate: peak AdamW learning rate.
    weight_decay: AdamW decoupled weight decay, applied to 2D kernels only.
    warmup_fraction: share of the steps spent warming the learning rate up from 0.
    label_smoothing: mass spread uniformly over the classes in the targets.
    max_shift: images are shifted by up to this many pixels in each direction
      (zero-filled) as augmentation; 0 disables it.
    seed: seed of initialisation, batch order, augmentation and dropout.
  """

  epochs: int = 40
  batch_size: int = 32
  learning_rate: float = 2e-3
  weight_decay: float = 0.05
  warmup_fraction: float = 0.1
  label_smoothing: float = 0.1
  max_shift: int = 1
  seed: int = 0

  def __post_init__(self):
    check_positive_ints(self, ("epochs", "batch_size"))
    if isinstance(self.max_shift, bool) or not isinstance(self.max_shift, int) \
        or self.max_shift < 0:
      raise ValueError(f"TrainConfig.max_shift must be an int >= 0, got {self.max_shift!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
    if not self.weight_decay >= 0:
      raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
    if not 0.0 <= self.warmup_fraction < 1.0:
      raise ValueError(
          f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(
          f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


class TrainResult(NamedTuple):
  """Outcome of `train`.

  Attributes:
    params: trained parameters (an `nnx.State` of the model's `nnx.Param`s).
    epoch_losses: mean training loss of each epoch, length epochs.
    seconds: wall-clock seconds of the run, compilation included.
    steps: optimizer steps taken (epochs * (training images // batch_size)).
  """

  params: Any
  epoch_losses: list[float]
  seconds: float
  steps: int


def _smoothed_loss(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Mean cross-entropy of logits (batch, classes) against labels (batch,) smoothed by
  `smoothing` (mass spread uniformly over the classes)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def shift_images(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Shifts each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

  Args:
    images: (batch, height, width, channels).
    key: PRNG key.
    max_shift: largest shift in pixels; 0 returns the images unchanged.

  Returns:
    Array of the same shape and dtype.
  """
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay; weight decay only on 2D (Linear) kernels."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=int(config.warmup_fraction * total_steps), decay_steps=total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)
  return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def accuracy(graphdef: nnx.GraphDef, params: Any, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> float:
  """Top-1 accuracy in [0, 1] of the model (graphdef, params) on images (n, h, w, c)."""
  correct = 0
  for start in range(0, len(images), batch_size):
    predicted = _predict(graphdef, params, images[start:start + batch_size])
    correct += int(np.sum(np.asarray(predicted) == labels[start:start + batch_size]))
  return correct / len(images)


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef: nnx.GraphDef, params: Any, images: jax.Array) -> jax.Array:
  """Predicted classes (n,) of images (n, h, w, c); compiled once per model structure."""
  return jnp.argmax(nnx.merge(graphdef, params)(images), axis=-1)


def train(graphdef: nnx.GraphDef, params: Any, data: ImageSplit, config: TrainConfig,
          *, description: str = "train", progress: bool = True) -> TrainResult:
  """Trains (graphdef, params) on data's training half.

  Args:
    graphdef: structure of the model, from `nnx.split(model)`.
    params: its parameters (`nnx.State`).
    data: the image split; only the training half is read.
    config: optimisation settings.
    description: label of the progress bar.
    progress: show a tqdm bar over epochs with the running loss.

  Returns:
    A `TrainResult`.
  """
  start = time.perf_counter()
  steps_per_epoch = len(data.train_images) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size ({config.batch_size}) exceeds the number of training "
                     f"images ({len(data.train_images)})")
  tx = make_optimizer(config, steps_per_epoch * config.epochs)
  opt_state = tx.init(params)

  @jax.jit
  def step(carry, images, labels, key):
    params, opt_state = carry
    shift_key, dropout_key = jax.random.split(key)
    images = shift_images(images, shift_key, config.max_shift)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, dropout_key)
      return _smoothed_loss(logits, labels, config.label_smoothing)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), epoch_losses, steps = run_epochs(step, (params, opt_state), data, config,
                                                description, progress)
  return TrainResult(params, epoch_losses, time.perf_counter() - start, steps)


def run_epochs(step: Callable, carry: Any, data: ImageSplit, config: TrainConfig,
               description: str, progress: bool) -> tuple[Any, list[float], int]:
  """Runs config.epochs epochs of ``carry, loss = step(carry, images, labels, key)``.

  Batches are drawn by `iterate_batches` (seeded by config.seed); keys are "rbg" keys:
  XLA's CPU compiler takes seconds per threefry-based dropout layer. Every run with the
  same config (dense or sparse) therefore sees the same batches and keys.

  Returns:
    (final carry, mean loss of each epoch, number of steps taken).
  """
  order_rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed, impl="rbg")
  epoch_losses, steps = [], 0
  steps_per_epoch = len(data.train_images) // config.batch_size
  # One bar over all steps: a Fashion-MNIST epoch takes long enough to want progress
  # (redrawn once a minute when written to a log file rather than a terminal).
  bar = tqdm(total=config.epochs * steps_per_epoch, desc=description, disable=not progress,
             leave=False, mininterval=1.0 if sys.stderr.isatty() else 60.0)
  for _ in range(config.epochs):
    losses = []
    for images, labels in iterate_batches(data.train_images, data.train_labels,
                                          config.batch_size, order_rng):
      key, step_key = jax.random.split(key)
      carry, loss = step(carry, images, labels, step_key)
      losses.append(loss)
      steps += 1
      bar.update()
    epoch_losses.append(float(np.mean(jax.device_get(losses))))
    bar.set_postfix(epoch=len(epoch_losses), loss=f"{epoch_losses[-1]:.3f}")
  bar.close()
  return carry, epoch_losses, steps


def init_model(model_config: ViTConfig, seed: int) -> tuple[nnx.GraphDef, Any]:
  """A freshly initialised ViT as (graphdef, params)."""
  return nnx.split(ViT(model_config, rngs=nnx.Rngs(seed)))


def train_dense(model_config: ViTConfig, train_config: TrainConfig, data: ImageSplit,
                *, progress: bool = True) -> tuple[nnx.GraphDef, Any, TrainResult]:
  """Initialises a ViT with train_config.seed and trains it densely.

  Returns:
    (graphdef, trained params, the `TrainResult`).
  """
  graphdef, params = init_model(model_config, train_config.seed)
  result = train(graphdef, params, data, train_config, description="dense", progress=progress)
  return graphdef, result.params, result


def train_same_budget(graphdef: nnx.GraphDef, dense_params: Any, data: ImageSplit,
                      finetune: TrainConfig, *, progress: bool = True) -> TrainResult:
  """The fair dense baseline of a sparse fine-tuning: the dense model trained on from its
  weights with exactly the fine-tuning's budget.

  Same `TrainConfig` (epochs, batch size, learning-rate schedule of `make_optimizer`,
  augmentation, seed, hence the same batch order and dropout keys) and the same number
  of steps as `sparse_step` fine-tuning run by `run_epochs` with that config; only the
  mask is missing. A sparse model that beats the original dense model but not this one
  owes its gain to the extra training, not to sparsity.
  """
  return train(graphdef, dense_params, data, finetune, description="dense, same budget",
               progress=progress)


def sparse_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: TrainConfig):
  """A jitted step ((stored, opt_state, permutations), images, labels, key) -> (carry, loss).

  ``stored`` holds the prunable kernels permuted by ``permutations`` (a Permutation by
  path, an argument of the step); the forward pass uses
  ``tree_unpermute(sparse_params(stored, opt_state), permutations)``, so the optimizer's
  masks are V:N:M on the permuted kernels and the model sees original coordinates.
  """
  @jax.jit
  def step(carry, images, labels, key):
    stored, opt_state, permutations = carry
    shift_key, dropout_key = jax.random.split(key)
    images = shift_images(images, shift_key, config.max_shift)

    def loss_fn(stored):
      params = vnm_jax.tree_unpermute(vnm_jax.sparse_params(stored, opt_state), permutations)
      logits = nnx.merge(graphdef, params)(images, dropout_key)
      return _smoothed_loss(logits, labels, config.label_smoothing)

    loss, grads = jax.value_and_grad(loss_fn)(stored)
    updates, opt_state = tx.update(grads, opt_state, stored)
    return (optax.apply_updates(stored, updates), opt_state, permutations), loss

  return step
