"""Train a DeiT-style ViT on scikit-learn's digits, then prune it to V:N:M and fine-tune.

Reproduce the dense baseline (2 CPU cores are enough):

    python -m train.vit --epochs 40

Run the pruning pipeline (dense training, then for each V:N:M config, with and without a
channel permutation: one-shot pruning, fixed-mask fine-tuning and SR-STE), writing a
results table (markdown + JSON) and a plot of accuracy against the matmul speedup measured
on this machine in the same run:

    python -m train.vit --preset full --out-dir bench/results/vit_full
    vnm-jax demo                      # the "short" preset, a few minutes on 2 CPU cores

The model is `vnm_jax.models.vit.ViT`; the data the fixed stratified split of
`vnm_jax.digits` (1437 train / 360 test). Training is AdamW (weight decay on the 2D
kernels only) with linear warm-up and cosine decay, label smoothing, and random shifts of
up to one pixel as augmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vnm_jax.benchmarking import measure_matmul_speedup
from vnm_jax.checkpoint import Checkpointer
from vnm_jax.config import VNMConfig
from vnm_jax.digits import NUM_CLASSES, DigitsSplit, iterate_batches, load_digits_split
from vnm_jax.format import compress
from vnm_jax.models.vit import ViT, ViTConfig, gemm_shapes, prunable_kernel_paths
from vnm_jax.permutation import Permutation
from vnm_jax.permutation_search import tree_permutations
from vnm_jax.sparse_training import fixed_mask, sparse_masks, sparse_params, sr_ste
from vnm_jax.trees import path_str, tree_apply_masks, tree_configs, tree_masks


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
    for name in ("epochs", "batch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
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
  """

  params: Any
  epoch_losses: list[float]
  seconds: float


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
  """Top-1 accuracy in [0, 1] of the model (graphdef, params) on images (n, 8, 8, 1)."""
  correct = 0
  for start in range(0, len(images), batch_size):
    predicted = _predict(graphdef, params, images[start:start + batch_size])
    correct += int(np.sum(np.asarray(predicted) == labels[start:start + batch_size]))
  return correct / len(images)


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef: nnx.GraphDef, params: Any, images: jax.Array) -> jax.Array:
  """Predicted classes (n,) of images (n, 8, 8, 1); compiled once per model structure."""
  return jnp.argmax(nnx.merge(graphdef, params)(images), axis=-1)


def train(graphdef: nnx.GraphDef, params: Any, data: DigitsSplit, config: TrainConfig,
          *, description: str = "train", progress: bool = True) -> TrainResult:
  """Trains (graphdef, params) on data's training half.

  Args:
    graphdef: structure of the model, from `nnx.split(model)`.
    params: its parameters (`nnx.State`).
    data: the digits split; only the training half is read.
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
    targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), config.label_smoothing)

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images, dropout_key)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), epoch_losses = _run_epochs(step, (params, opt_state), data, config, description,
                                          progress)
  return TrainResult(params, epoch_losses, time.perf_counter() - start)


def _run_epochs(step: Callable, carry: Any, data: DigitsSplit, config: TrainConfig,
                description: str, progress: bool) -> tuple[Any, list[float]]:
  """Runs config.epochs epochs of ``carry, loss = step(carry, images, labels, key)``.

  Batches are drawn by `iterate_batches` (seeded by config.seed); keys are "rbg" keys:
  XLA's CPU compiler takes seconds per threefry-based dropout layer.

  Returns:
    (final carry, mean loss of each epoch).
  """
  order_rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed, impl="rbg")
  epoch_losses = []
  bar = tqdm(range(config.epochs), desc=description, disable=not progress, leave=False)
  for _ in bar:
    losses = []
    for images, labels in iterate_batches(data.train_images, data.train_labels,
                                          config.batch_size, order_rng):
      key, step_key = jax.random.split(key)
      carry, loss = step(carry, images, labels, step_key)
      losses.append(loss)
    epoch_losses.append(float(np.mean(jax.device_get(losses))))
    bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
  return carry, epoch_losses


def init_model(model_config: ViTConfig, seed: int) -> tuple[nnx.GraphDef, Any]:
  """A freshly initialised ViT as (graphdef, params)."""
  return nnx.split(ViT(model_config, rngs=nnx.Rngs(seed)))


def train_dense(model_config: ViTConfig, train_config: TrainConfig, data: DigitsSplit,
                *, progress: bool = True) -> tuple[nnx.GraphDef, Any, TrainResult]:
  """Initialises a ViT with train_config.seed and trains it densely.

  Returns:
    (graphdef, trained params, the `TrainResult`).
  """
  graphdef, params = init_model(model_config, train_config.seed)
  result = train(graphdef, params, data, train_config, description="dense", progress=progress)
  return graphdef, result.params, result


# ----------------------------------------------------------------------------- pruning pipeline

METHODS = ("one-shot", "fixed-mask", "sr-ste")


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
  """Sizes of one `run_pipeline` run.

  Attributes:
    name: label written into the results.
    model: the ViT's sizes.
    dense: settings of the dense training.
    finetune: settings of the fixed-mask and SR-STE fine-tuning (from the dense weights).
    configs: the V:N:M configs, as "V:N:M" strings ("2:4" is 64:2:4).
    permutation_seconds: time budget of each kernel's permutation search.
    train_images: train on only the first this many training images (None: all 1437).
    speed_batch: images per inference batch whose GEMMs are timed (tokens = batch * 17).
    speed_repeats: timed runs of each matmul (the median is kept).
  """

  name: str
  model: ViTConfig = ViTConfig()
  dense: TrainConfig = TrainConfig()
  finetune: TrainConfig = TrainConfig(epochs=25, learning_rate=1e-3)
  configs: tuple[str, ...] = ("2:4", "64:2:5", "64:2:8")
  permutation_seconds: float = 2.0
  train_images: int | None = None
  speed_batch: int = 128
  speed_repeats: int = 10

  def __post_init__(self):
    if not self.configs:
      raise ValueError("PipelinePreset.configs must name at least one V:N:M config")
    for text in self.configs:
      VNMConfig.parse(text)
    if self.train_images is not None and not 1 <= self.train_images:
      raise ValueError(f"PipelinePreset.train_images must be >= 1 or None, got "
                       f"{self.train_images!r}")


PRESETS = {
    # `vnm-jax demo`: a few minutes on 2 idle CPU cores.
    "short": PipelinePreset(
        name="short", dense=TrainConfig(epochs=25),
        finetune=TrainConfig(epochs=6, learning_rate=1e-3), configs=("64:2:5", "64:2:8"),
        permutation_seconds=0.5, speed_batch=64, speed_repeats=5),
    "full": PipelinePreset(name="full"),
}


@dataclasses.dataclass(frozen=True)
class VariantResult:
  """One row of the results table.

  Attributes:
    config: the V:N:M config, "V:N:M".
    permuted: whether channel permutations were searched before pruning.
    method: "one-shot" (prune the dense model), "fixed-mask" (fine-tune with the
      one-shot mask fixed) or "sr-ste" (fine-tune with SR-STE, mask recomputed every step).
    test_accuracy: top-1 accuracy in [0, 1] on the 360 test images.
    speedup: dense / V:N:M time of the model's pruned GEMMs (block 0's compressed
      weights, this config and permutation), measured in this run on this device.
    seconds: wall time of this method: one-shot: permutation search, masks and speed
      measurement; fine-tuning: its training (compilation included).
  """

  config: str
  permuted: bool
  method: str
  test_accuracy: float
  speedup: float
  seconds: float


@dataclasses.dataclass
class SparseModel:
  """A pruned model of one variant, in original (unpermuted) coordinates.

  Attributes:
    params: the pruned params (`nnx.State`); pruned entries are exactly zero.
    masks: the params' structure, a bool mask at every pruned kernel, None elsewhere.
    permutations: kernel path -> `Permutation` the masks' groups were formed on (empty
      without permutation).
  """

  params: Any
  masks: Any
  permutations: dict[str, Permutation]


@dataclasses.dataclass
class PipelineResult:
  """Outcome of `run_pipeline`.

  Attributes:
    preset: the preset's name.
    device: the device kind the speedups were measured on.
    dense_accuracy: test accuracy in [0, 1] of the dense model.
    dense_params: the dense model's params (`nnx.State`).
    dense_seconds: wall time of the dense training.
    variants: one `VariantResult` per (config, permuted, method).
    timings: "config|permuted" -> the `MatmulTiming.as_dict()` of each timed GEMM.
    models: (config, permuted, method) -> its `SparseModel`.
    graphdef: the ViT's structure (`nnx.split`), for `models`' params.
    table_path, json_path, plot_path: files written.
  """

  preset: str
  device: str
  dense_accuracy: float
  dense_params: Any
  dense_seconds: float
  variants: list[VariantResult]
  timings: dict[str, list[dict]]
  models: dict[tuple[str, bool, str], SparseModel]
  graphdef: nnx.GraphDef
  table_path: pathlib.Path
  json_path: pathlib.Path
  plot_path: pathlib.Path

  def to_markdown(self) -> str:
    """The results table (accuracies in %, differences in points)."""
    lines = [f"Dense test accuracy {100 * self.dense_accuracy:.2f} % (preset {self.preset!r}; "
             f"speedups measured on {self.device}).", "",
             "| config | permutation | method | test acc (%) | vs dense (points) | GEMM speedup |",
             "|---|---|---|---|---|---|"]
    for row in self.variants:
      lines.append(f"| {row.config} | {'yes' if row.permuted else 'no'} | {row.method} | "
                   f"{100 * row.test_accuracy:.2f} | "
                   f"{100 * (row.test_accuracy - self.dense_accuracy):+.2f} | "
                   f"{row.speedup:.2f}x |")
    lines += ["", *self.target_lines()]
    return "\n".join(lines)

  def target_lines(self) -> list[str]:
    """Whether the best fine-tuned accuracy of 64:2:5 / 64:2:8 meets the issue's targets."""
    lines = []
    for config, allowed in TARGET_POINTS.items():
      tuned = [row for row in self.variants if row.config == config and row.method != "one-shot"]
      if not tuned:
        continue
      best = max(tuned, key=lambda row: row.test_accuracy)
      gap = 100 * (self.dense_accuracy - best.test_accuracy)
      verdict = "met" if gap <= allowed else "NOT met"
      lines.append(f"- {config}: best fine-tuned {100 * best.test_accuracy:.2f} % ({best.method}, "
                   f"permutation {'yes' if best.permuted else 'no'}), {-gap:+.2f} points vs "
                   f"dense; target: at most {allowed} points below: {verdict}.")
    return lines

  def as_dict(self) -> dict:
    """A JSON-ready dict of everything but the models."""
    return {"preset": self.preset, "device": self.device,
            "dense_accuracy": self.dense_accuracy, "dense_seconds": self.dense_seconds,
            "variants": [dataclasses.asdict(row) for row in self.variants],
            "timings": self.timings, "targets": self.target_lines()}


# Largest allowed drop (test accuracy points) of the best fine-tuned model below dense.
TARGET_POINTS = {"64:2:5": 0.5, "64:2:8": 1.5}


def _kernel_names(model_config: ViTConfig) -> list[str]:
  """The prunable kernels' path strings, as `vnm_jax.trees` names them."""
  return ["/".join(map(str, path)) for path in prunable_kernel_paths(model_config)]


def _by_path(tree: Any) -> dict[str, Any]:
  """{path string: leaf} of a tree (None leaves of masks trees are skipped)."""
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def permutation_indices(params: Any, kernel_names: Sequence[str],
                        permutations: dict[str, Permutation]) -> dict[str, tuple[Any, Any]]:
  """kernel path -> (input order, output order) int32 arrays; identity where not permuted.

  Full index arrays (never None) give permuted and unpermuted variants the same pytree
  structure, so one compiled training step serves both.
  """
  leaves = _by_path(params)
  indices = {}
  for name in kernel_names:
    k, n = leaves[name].shape
    permutation = permutations.get(name) or Permutation(None, None)
    inputs = np.arange(k) if permutation.inputs is None else permutation.inputs
    outputs = np.arange(n) if permutation.outputs is None else permutation.outputs
    indices[name] = (jnp.asarray(inputs, jnp.int32), jnp.asarray(outputs, jnp.int32))
  return indices


def reorder_kernels(tree: Any, indices: dict[str, tuple[Any, Any]], *, undo: bool = False) -> Any:
  """Each indexed kernel K of ``tree`` as ``K[inputs][:, outputs]`` (or back, with undo=True).

  ``tree`` is params or masks (None leaves pass through). V:N:M groups formed on the
  reordered kernels are a permutation's groups in the original coordinates. Jittable.
  """
  def reorder(path, leaf):
    name = path_str(path)
    if name not in indices:
      return leaf
    inputs, outputs = indices[name]
    if undo:
      return leaf[jnp.argsort(inputs)][:, jnp.argsort(outputs)]
    return leaf[inputs][:, outputs]

  return jax.tree_util.tree_map_with_path(reorder, tree)


def _sparse_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: TrainConfig):
  """A jitted step ((stored, opt_state, indices), images, labels, key) -> (carry, loss).

  ``stored`` holds the prunable kernels reordered by ``indices``; the forward pass uses
  ``reorder_kernels(sparse_params(stored, opt_state), undo=True)``, so the optimizer's
  masks are V:N:M on the reordered kernels and the model sees original coordinates.
  """
  @jax.jit
  def step(carry, images, labels, key):
    stored, opt_state, indices = carry
    shift_key, dropout_key = jax.random.split(key)
    images = shift_images(images, shift_key, config.max_shift)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), config.label_smoothing)

    def loss_fn(stored):
      params = reorder_kernels(sparse_params(stored, opt_state), indices, undo=True)
      logits = nnx.merge(graphdef, params)(images, dropout_key)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(stored)
    updates, opt_state = tx.update(grads, opt_state, stored)
    return (optax.apply_updates(stored, updates), opt_state, indices), loss

  return step


def _gemm_speedup(model_config: ViTConfig, params: Any, masks: Any, config: VNMConfig,
                  permutations: dict[str, Permutation], batch: int,
                  repeats: int) -> tuple[float, list[dict]]:
  """Dense / V:N:M time summed over block 0's four pruned GEMMs, compressed as pruned.

  Every block has the same four GEMM shapes, so this is the speedup of all pruned GEMMs.
  """
  params_by_path = _by_path(params)
  masks_by_path = _by_path(masks)
  shapes = gemm_shapes(model_config, batch)
  timings = []
  for path in prunable_kernel_paths(model_config)[:4]:
    name = "/".join(map(str, path))
    tokens, k, n = shapes[path[3]]
    weight = compress(params_by_path[name], config, mask=masks_by_path[name],
                      permutation=permutations.get(name))
    timings.append(measure_matmul_speedup(k, n, tokens, config, weight=weight,
                                          repeats=repeats).as_dict())
  speedup = sum(t["dense_seconds"] for t in timings) / sum(t["vnm_seconds"] for t in timings)
  return speedup, timings


def run_pipeline(preset: str | PipelinePreset, out_dir: str | os.PathLike, *,
                 progress: bool = True, log: Callable[[str], None] = print) -> PipelineResult:
  """Dense training, then V:N:M pruning and fine-tuning of every variant; writes the results.

  For each config of the preset, without and with channel permutations
  (`vnm_jax.permutation_search.tree_permutations` on |W| of the dense model): one-shot
  magnitude pruning (column-L1 rule) of the block kernels (`prunable_kernel_paths`),
  fixed-mask fine-tuning from it, and SR-STE fine-tuning from the dense weights (the
  mask recomputed every step, in the permuted coordinates for permuted variants). The
  matmul speedup of each (config, permutation) is measured in the same run with
  `measure_matmul_speedup` on the model's GEMM shapes.

  Args:
    preset: a name in `PRESETS` ("short", "full") or a `PipelinePreset`.
    out_dir: where results.md, results.json and accuracy_vs_speedup.png are written
      (created if missing).
    progress: show tqdm bars (training epochs, permutation search).
    log: receives one line per finished stage.

  Returns:
    A `PipelineResult`.
  """
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"preset must be one of {sorted(PRESETS)} or a PipelinePreset, "
                       f"got {preset!r}")
    preset = PRESETS[preset]
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = load_digits_split()
  if preset.train_images is not None:
    data = data._replace(train_images=data.train_images[:preset.train_images],
                         train_labels=data.train_labels[:preset.train_images])
  graphdef, dense_params, dense_run = train_dense(preset.model, preset.dense, data,
                                                  progress=progress)
  evaluate = lambda params: accuracy(graphdef, params, data.test_images, data.test_labels)
  dense_accuracy = evaluate(dense_params)
  log(f"dense: test acc {100 * dense_accuracy:.2f} % ({dense_run.seconds:.0f} s)")

  names = _kernel_names(preset.model)
  selected = lambda path, leaf: path in names
  steps = (len(data.train_images) // preset.finetune.batch_size) * preset.finetune.epochs
  inner = make_optimizer(preset.finetune, steps)
  # fixed_mask's update reads the masks from its state, not from the closure: one
  # compiled step serves every config and permutation (the masks are step arguments).
  fixed_step = None
  variants, timings, models = [], {}, {}
  for config_text in preset.configs:
    config = VNMConfig.parse(config_text)
    configs_tree = tree_configs(dense_params, config, filter=selected)
    sr_ste_tx = sr_ste(inner, configs_tree)
    sr_ste_step = _sparse_step(graphdef, sr_ste_tx, preset.finetune)
    for permuted in (False, True):
      started = time.perf_counter()
      permutations = {}
      if permuted:
        permutations, table = tree_permutations(
            dense_params, config, filter=selected, time_budget_s=preset.permutation_seconds,
            progress=progress)
        log(f"{config} permutations: mean share of the gap to unstructured pruning closed "
            f"{table.mean_gap_closed:.3f}")
      indices = permutation_indices(dense_params, names, permutations)
      stored = reorder_kernels(dense_params, indices)
      stored_masks = tree_masks(stored, config, filter=selected)
      unpermuted = lambda tree: reorder_kernels(tree, indices, undo=True)
      one_shot = SparseModel(unpermuted(tree_apply_masks(stored, stored_masks)),
                             unpermuted(stored_masks), permutations)
      speedup, timings[f"{config}|{permuted}"] = _gemm_speedup(
          preset.model, one_shot.params, one_shot.masks, config, permutations,
          preset.speed_batch, preset.speed_repeats)
      label = f"{config} {'permuted' if permuted else 'identity'}"
      outcomes = {"one-shot": one_shot}
      seconds = {"one-shot": time.perf_counter() - started}
      fixed_tx = fixed_mask(inner, stored_masks)
      if fixed_step is None:
        fixed_step = _sparse_step(graphdef, fixed_tx, preset.finetune)
      for method, tx, step in (("fixed-mask", fixed_tx, fixed_step),
                               ("sr-ste", sr_ste_tx, sr_ste_step)):
        method_started = time.perf_counter()
        opt_state = tx.init(stored)
        (tuned, opt_state, _), _ = _run_epochs(step, (stored, opt_state, indices), data,
                                               preset.finetune, f"{label} {method}", progress)
        outcomes[method] = SparseModel(unpermuted(sparse_params(tuned, opt_state)),
                                       unpermuted(sparse_masks(opt_state)), permutations)
        seconds[method] = time.perf_counter() - method_started
      for method, model in outcomes.items():
        models[(str(config), permuted, method)] = model
        variants.append(VariantResult(str(config), permuted, method, evaluate(model.params),
                                      speedup, seconds[method]))
      log(f"{label}: " + ", ".join(f"{row.method} {100 * row.test_accuracy:.2f} %"
                                   for row in variants[-3:])
          + f"; GEMM speedup {speedup:.2f}x ({time.perf_counter() - started:.0f} s)")

  result = PipelineResult(
      preset=preset.name, device=jax.devices()[0].device_kind, dense_accuracy=dense_accuracy,
      dense_params=dense_params, dense_seconds=dense_run.seconds, variants=variants,
      timings=timings, models=models, graphdef=graphdef, table_path=out_dir / "results.md",
      json_path=out_dir / "results.json",
      plot_path=out_dir / "accuracy_vs_speedup.png")
  result.table_path.write_text(result.to_markdown() + "\n")
  result.json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
  plot_accuracy_vs_speedup(result, result.plot_path)
  return result


def plot_accuracy_vs_speedup(result: PipelineResult, path: str | os.PathLike) -> None:
  """Scatter of test accuracy against measured GEMM speedup, one point per variant.

  Colour: config; marker: method; filled: with permutation, hollow: without. The dense
  model is the dashed line (and the star at speedup 1).
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  markers = {"one-shot": "o", "fixed-mask": "s", "sr-ste": "^"}
  configs = list(dict.fromkeys(row.config for row in result.variants))
  colours = dict(zip(configs, plt.get_cmap("tab10").colors))
  figure, axes = plt.subplots(figsize=(8.5, 4.5))
  axes.axhline(100 * result.dense_accuracy, color="black", linestyle="--", linewidth=1)
  axes.scatter([1.0], [100 * result.dense_accuracy], marker="*", s=160, color="black",
               label=f"dense {100 * result.dense_accuracy:.2f} %")
  for row in result.variants:
    colour = colours[row.config]
    axes.scatter([row.speedup], [100 * row.test_accuracy], marker=markers[row.method], s=60,
                 edgecolors=colour, facecolors=colour if row.permuted else "none", linewidths=1.5)
  for config in configs:
    axes.scatter([], [], marker="o", color=colours[config], label=config)
  for method, marker in markers.items():
    axes.scatter([], [], marker=marker, edgecolors="grey", facecolors="none", label=method)
  axes.scatter([], [], marker="o", color="grey", label="filled: with permutation")
  axes.set_xlabel(f"GEMM speedup over dense, measured on {result.device}")
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(f"ViT on digits, V:N:M pruning (preset {result.preset!r})")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def save_checkpoint(directory: str | os.PathLike, model_config: ViTConfig, params: Any) -> None:
  """Saves a ViT's params with `vnm_jax.checkpoint.Checkpointer` (step 0) and its config.

  `load_checkpoint` (and `vnm-jax prune DIR`) rebuild the model from the metadata.
  """
  with Checkpointer(directory) as checkpointer:
    checkpointer.save(0, {"params": params},
                      metadata={"model": "vit", "vit_config": dataclasses.asdict(model_config)})


def load_checkpoint(directory: str | os.PathLike) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, params) of a ViT saved by `save_checkpoint` (latest step)."""
  with Checkpointer(directory) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint")
    metadata = checkpointer.metadata()
    if metadata.get("model") != "vit":
      raise ValueError(f"{directory} is not a ViT checkpoint (metadata model="
                       f"{metadata.get('model')!r}); write one with `vnm-jax vit --save DIR`")
    model_config = ViTConfig(**metadata["vit_config"])
    graphdef, target = nnx.split(nnx.eval_shape(lambda: ViT(model_config, rngs=nnx.Rngs(0))))
    return graphdef, checkpointer.restore({"params": target})["params"]


# ViTConfig fields set by the digits themselves, not by the command line.
_DATA_FIXED_FIELDS = ("image_size", "channels", "num_classes")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.vit",
                                   description="Train a DeiT-style ViT on the digits.")
  for defaults in (ViTConfig(), TrainConfig()):
    for field in dataclasses.fields(defaults):
      if field.name in _DATA_FIXED_FIELDS:
        continue
      default = getattr(defaults, field.name)
      parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default),
                          default=default, help=f"(default {default})")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="run the pruning pipeline with this preset (its own sizes; the "
                           "model and training flags above are then not used)")
  parser.add_argument("--save", default=None, metavar="DIR",
                      help="save the dense model's params here (for `vnm-jax prune DIR`)")
  parser.add_argument("--out-dir", default="vit_results",
                      help="where the pipeline writes its table and plot (default %(default)s)")
  return parser.parse_args(argv)


def _configs_from_args(args: argparse.Namespace) -> tuple[ViTConfig, TrainConfig]:
  model_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ViTConfig)
                  if f.name not in _DATA_FIXED_FIELDS}
  train_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
  return ViTConfig(**model_fields), TrainConfig(**train_fields)


def run_and_report(preset: str | PipelinePreset, out_dir: str | os.PathLike) -> PipelineResult:
  """`run_pipeline`, then prints the results table and where the files were written."""
  started = time.perf_counter()
  result = run_pipeline(preset, out_dir)
  print(f"\n{result.to_markdown()}\n")
  print(f"total {time.perf_counter() - started:.0f} s; table: {result.table_path}, "
        f"JSON: {result.json_path}\nplot written to {result.plot_path}")
  return result


def main(argv: Sequence[str] | None = None) -> int:
  """Trains the dense baseline and prints its test accuracy, or runs the pipeline (--preset)."""
  args = _parse_args(argv)
  if args.preset is not None:
    run_and_report(args.preset, args.out_dir)
    return 0
  model_config, train_config = _configs_from_args(args)
  data = load_digits_split()
  cpu_start = time.process_time()
  graphdef, params, result = train_dense(model_config, train_config, data)
  test_accuracy = accuracy(graphdef, params, data.test_images, data.test_labels)
  train_accuracy = accuracy(graphdef, params, data.train_images, data.train_labels)
  print(f"dense ViT {model_config}\n  {train_config}\n"
        f"  final loss {result.epoch_losses[-1]:.4f}  train acc {100 * train_accuracy:.2f} %  "
        f"test acc {100 * test_accuracy:.2f} %  wall {result.seconds:.1f} s  "
        f"process CPU {time.process_time() - cpu_start:.1f} s")
  if args.save is not None:
    save_checkpoint(args.save, model_config, params)
    print(f"params saved to {args.save}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
