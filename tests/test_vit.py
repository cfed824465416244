"""Tests of the digits data, the ViT model, its dense training and pruning pipeline (tiny sizes)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vnm_reference as ref
from vnm_reference import assert_close
from vnm_jax import Permutation, tree_permute, tree_unpermute
from vnm_recipes.data import digits, images
from vnm_recipes.models import vit
from vnm_recipes.vit import pipeline as vit_pipeline
from vnm_recipes.vit import presets as vit_presets
from vnm_recipes.vit import reports as vit_reports
from vnm_recipes.vit import training as vit_training

TINY = vit.ViTConfig(dim=16, depth=2, num_heads=2, mlp_dim=32)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def split():
  return digits.load_digits_split()


def test_split_sizes_dtypes_and_range(split):
  assert split.train_images.shape == (1437, 8, 8, 1)
  assert split.test_images.shape == (360, 8, 8, 1)
  assert split.train_labels.shape == (1437,) and split.test_labels.shape == (360,)
  assert split.train_images.dtype == np.float32 and split.train_labels.dtype == np.int32
  for images in (split.train_images, split.test_images):
    assert images.min() == 0.0 and images.max() == 1.0


def test_split_is_a_partition_of_all_digits(split):
  from sklearn.datasets import load_digits
  raw = load_digits()
  all_rows = sorted(
      (tuple((raw.images[i] / 16).astype(np.float32).ravel()), int(raw.target[i]))
      for i in range(len(raw.target)))
  split_rows = sorted(
      [(tuple(x.ravel()), int(y)) for x, y in zip(split.train_images, split.train_labels)]
      + [(tuple(x.ravel()), int(y)) for x, y in zip(split.test_images, split.test_labels)])
  assert split_rows == all_rows


def test_split_is_stratified_and_deterministic(split):
  from sklearn.datasets import load_digits
  totals = np.bincount(load_digits().target, minlength=10)
  test_counts = np.bincount(split.test_labels, minlength=10)
  np.testing.assert_allclose(test_counts, totals * 360 / 1797, atol=1.0)
  again = digits.load_digits_split()
  np.testing.assert_array_equal(again.test_images, split.test_images)
  np.testing.assert_array_equal(again.train_labels, split.train_labels)
  other = digits.load_digits_split(seed=1)
  assert not np.array_equal(other.test_labels, split.test_labels)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (1790, ValueError), (0.2, TypeError),
                                        (True, TypeError)])
def test_split_rejects_bad_test_size(bad, error):
  with pytest.raises(error, match="test_size"):
    digits.load_digits_split(test_size=bad)


def test_iterate_batches_covers_each_image_once_per_epoch():
  pixels = np.arange(10, dtype=np.float32)[:, None]
  labels = np.arange(10)
  batches = list(images.iterate_batches(pixels, labels, 3, np.random.default_rng(0)))
  assert [len(x) for x, _ in batches] == [3, 3, 3]
  seen = np.concatenate([y for _, y in batches])
  assert len(set(seen.tolist())) == 9
  for x, y in batches:
    np.testing.assert_array_equal(x[:, 0], y)


@pytest.mark.parametrize("batch_size", [0, 11])
def test_iterate_batches_rejects_bad_batch_size(batch_size):
  with pytest.raises(ValueError, match="batch_size"):
    list(images.iterate_batches(np.zeros((10, 2)), np.zeros(10), batch_size,
                                np.random.default_rng(0)))


# ----------------------------------------------------------------------------- model

def test_patchify_matches_loop():
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  patches = np.asarray(vit.patchify(jnp.asarray(images), 2))
  expected = np.zeros((2, 16, 12), np.float32)
  for b in range(2):
    for row in range(4):
      for col in range(4):
        expected[b, row * 4 + col] = images[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2].ravel()
  np.testing.assert_array_equal(patches, expected)


def test_sincos_position_embedding_formula():
  grid, dim = 3, 8  # dim // 4 = 2 frequencies: 1 and 1 / 10000 ** (1 / 2)
  table = vit.sincos_position_embedding(grid, dim)
  assert table.shape == (1, 1 + grid * grid, dim)
  np.testing.assert_array_equal(table[0, 0], 0.0)
  frequencies = (1.0, 0.01)
  for row in range(grid):
    for col in range(grid):
      expected = ([math.sin(row * f) for f in frequencies] + [math.cos(row * f) for f in frequencies]
                  + [math.sin(col * f) for f in frequencies] + [math.cos(col * f) for f in frequencies])
      np.testing.assert_allclose(table[0, 1 + row * grid + col], expected, rtol=1e-6, atol=1e-7)


def _reference_forward(model: vit.ViT, images: np.ndarray) -> np.ndarray:
  """The ViT forward pass in float64 numpy, read straight from the parameters."""
  c = model.config
  get = lambda p: np.asarray(p[...], np.float64)
  linear = lambda layer, x: x @ get(layer.kernel) + get(layer.bias)

  def layer_norm(layer, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layer.epsilon) * get(layer.scale) + get(layer.bias)

  def gelu(x):  # tanh approximation, as jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  b, p = images.shape[0], c.patch_size
  grid = c.image_size // p
  patches = np.stack([images[:, r * p:(r + 1) * p, q * p:(q + 1) * p].reshape(b, -1)
                      for r in range(grid) for q in range(grid)], axis=1)
  x = np.concatenate([np.repeat(get(model.cls_token), b, 0),
                      linear(model.patch_embedding, patches)], axis=1)
  x = x + get(model.position_embedding)
  head_dim = c.dim // c.num_heads
  for block in model.blocks:
    qkv = linear(block.attention.qkv, layer_norm(block.norm1, x))
    heads = []
    for h in range(c.num_heads):
      cut = lambda part: qkv[..., part * c.dim + h * head_dim:part * c.dim + (h + 1) * head_dim]
      logits = cut(0) @ cut(1).transpose(0, 2, 1) / np.sqrt(head_dim)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      heads.append(weights @ cut(2))
    x = x + linear(block.attention.out, np.concatenate(heads, -1))
    x = x + linear(block.mlp.fc2, gelu(linear(block.mlp.fc1, layer_norm(block.norm2, x))))
  return linear(model.head, layer_norm(model.norm, x[:, 0]))


def _jitted_forward(model: vit.ViT):
  """model(images, dropout_key) compiled once (eager NNX calls are slow to dispatch)."""
  graphdef, params = nnx.split(model)
  return jax.jit(lambda images, key: nnx.merge(graphdef, params)(images, key))


def test_forward_matches_numpy_reference():
  model = vit.ViT(TINY, rngs=nnx.Rngs(3))
  # Perturb the zero-initialised biases and unit scales so that they are exercised too.
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                                 nnx.state(model)))
  images = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
  logits = np.asarray(_jitted_forward(model)(images, None))
  assert logits.shape == (3, 10)
  assert_close(logits, _reference_forward(model, images), rtol=2e-4)


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_dropout_only_with_a_key(rate):
  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  config = dataclasses.replace(TINY, depth=1, dropout=rate)
  graphdef, params = nnx.split(vit.ViT(config, rngs=nnx.Rngs(0)))

  @jax.jit
  def outputs(images):  # one compilation for both calls
    model = nnx.merge(graphdef, params)
    # rbg: threefry-based dropout takes XLA's CPU compiler ~10 s per block.
    return model(images), model(images, jax.random.key(0, impl="rbg"))

  plain, dropped = map(np.asarray, outputs(images))
  assert np.allclose(dropped, plain) == (rate == 0.0)


def test_prunable_kernels_are_2d_in_out_linears():
  model = vit.ViT(TINY, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  shapes = {}
  for path in vit.prunable_kernel_paths(TINY):
    node = state
    for key in path:
      node = node[key]
    shapes[path[2:4]] = node.shape
  assert len(vit.prunable_kernel_paths(TINY)) == 4 * TINY.depth
  assert shapes == {("attention", "qkv"): (16, 48), ("attention", "out"): (16, 16),
                    ("mlp", "fc1"): (16, 32), ("mlp", "fc2"): (32, 16)}
  gemms = vit.gemm_shapes(TINY, batch_size=5)
  assert {name: shape[1:] for name, shape in gemms.items()} == {
      "qkv": (16, 48), "out": (16, 16), "fc1": (16, 32), "fc2": (32, 16)}
  assert all(shape[0] == 5 * 17 for shape in gemms.values())


@pytest.mark.parametrize("changes, match", [
    (dict(patch_size=3), "patch_size"), (dict(num_heads=3), "num_heads"),
    (dict(dim=18, num_heads=2), "dim"), (dict(depth=0), "depth"),
    (dict(dropout=1.0), "dropout"), (dict(mlp_dim=2.5), "mlp_dim")])
def test_config_rejects_bad_values(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **changes)


def test_model_rejects_wrong_image_shape():
  model = vit.ViT(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="images must have shape"):
    model(jnp.zeros((2, 8, 8)))


# ----------------------------------------------------------------------------- training

def test_shift_images_moves_each_image_within_range():
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 8, 8, 1)), jnp.float32)
  shifted = np.asarray(vit_training.shift_images(images, jax.random.key(0), 1))
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets_seen = set()
  for i in range(16):
    matches = [(dy, dx) for dy in range(3) for dx in range(3)
               if np.array_equal(shifted[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert matches, f"image {i} is not a shift of its input"
    offsets_seen.update(matches)
  assert len(offsets_seen) > 1
  np.testing.assert_array_equal(vit_training.shift_images(images, jax.random.key(0), 0), images)


def test_accuracy_matches_direct_count(split):
  graphdef, params = vit_training.init_model(TINY, seed=0)
  images, labels = split.test_images[:50], split.test_labels[:50]
  predicted = np.argmax(np.asarray(_jitted_forward(nnx.merge(graphdef, params))(images, None)), -1)
  expected = float(np.mean(predicted == labels))
  assert vit_training.accuracy(graphdef, params, images, labels, batch_size=16) == expected


def test_dense_training_reduces_loss_and_beats_chance(split):
  small = images.ImageSplit(split.train_images[:512], split.train_labels[:512],
                             split.test_images, split.test_labels)
  model_config = vit.ViTConfig(dim=32, depth=1, num_heads=2, mlp_dim=64)
  config = vit_training.TrainConfig(epochs=8, batch_size=32, learning_rate=1e-2, max_shift=0,
                                  label_smoothing=0.0, seed=0)
  graphdef, params, result = vit_training.train_dense(model_config, config, small, progress=False)
  assert len(result.epoch_losses) == 8
  assert result.epoch_losses[-1] < result.epoch_losses[0] - 1.0
  # Chance is 0.1; 8 epochs on 512 images reach about 0.7.
  assert vit_training.accuracy(graphdef, params, small.test_images, small.test_labels) > 0.5


@pytest.mark.parametrize("changes, match", [
    (dict(epochs=0), "epochs"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(max_shift=-1), "max_shift"), (dict(warmup_fraction=1.0), "warmup_fraction"),
    (dict(label_smoothing=-0.1), "label_smoothing")])
def test_train_config_rejects_bad_values(changes, match):
  with pytest.raises(ValueError, match=match):
    vit_training.TrainConfig(**changes)


def test_train_rejects_batch_larger_than_data(split):
  tiny = images.ImageSplit(split.train_images[:8], split.train_labels[:8],
                            split.test_images, split.test_labels)
  graphdef, params = vit_training.init_model(TINY, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    vit_training.train(graphdef, params, tiny, vit_training.TrainConfig(batch_size=16),
                     progress=False)


# ----------------------------------------------------------------------------- pruning pipeline

TINY_PRESET = vit_presets.PipelinePreset(
    name="tiny", model=dataclasses.replace(TINY, depth=1), dense=vit_training.TrainConfig(epochs=1),
    finetune=vit_training.TrainConfig(epochs=1, learning_rate=1e-3), configs=("16:2:5",),
    permutation_seconds=0.2, train_images=64, speed_batch=1, speed_repeats=1)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  return vit_pipeline.run_pipeline(TINY_PRESET, tmp_path_factory.mktemp("pipeline"),
                                 progress=False, log=lambda line: None)


def _kernels(tree):
  """{path: numpy array} of the block kernels of params or masks."""
  from vnm_jax import path_str
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if path_str(p).startswith("blocks/") and path_str(p).endswith("kernel")}


def test_pipeline_table_rows_files_and_plot(pipeline):
  import json
  rows = [(r.config, r.permuted, r.method) for r in pipeline.seeds[0].variants]
  assert rows == [("16:2:5", permuted, method) for permuted in (False, True)
                  for method in vit_reports.METHODS]
  for row in pipeline.seeds[0].variants:
    assert 0.0 <= row.test_accuracy <= 1.0 and row.speedup > 0
  table = pipeline.table_path.read_text()
  assert table.count("| 16:2:5 | no |") == 3 and table.count("| 16:2:5 | yes |") == 3
  assert "GEMM speedup" in table and table.count("| 16:2:5 | sr-ste |") == 1  # permutation effect
  assert table.count("| dense | - |") == 2 and "same budget (+1 epochs) |" in table
  saved = json.loads(pipeline.json_path.read_text())["seeds"][0]
  assert [v["method"] for v in saved["variants"]] == [r[2] for r in rows]
  assert saved["dense_accuracy"] == pipeline.seeds[0].dense_accuracy
  assert set(saved["timings"]) == {"16:2:5|False", "16:2:5|True"}
  assert all(len(t) == 4 for t in saved["timings"].values())  # qkv, out, fc1, fc2
  assert pipeline.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_one_shot_is_the_column_l1_mask_of_the_dense_weights(pipeline):
  dense = _kernels(pipeline.seeds[0].dense_params)
  model = pipeline.seeds[0].models[("16:2:5", False, "one-shot")]
  masks, params = _kernels(model.masks), _kernels(model.params)
  assert set(masks) == set(dense) and len(masks) == 4
  for path, kernel in dense.items():
    expected = ref.column_l1_mask(np.abs(kernel), 16, 5)
    np.testing.assert_array_equal(masks[path], expected, err_msg=path)
    np.testing.assert_array_equal(params[path], np.where(expected, kernel, 0), err_msg=path)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("method", vit_reports.METHODS)
def test_pipeline_masks_are_vnm_and_pruned_weights_zero(pipeline, permuted, method):
  model = pipeline.seeds[0].models[("16:2:5", permuted, method)]
  masks, params = _kernels(model.masks), _kernels(model.params)
  assert bool(model.permutations) == permuted
  for path, mask in masks.items():
    permutation = model.permutations.get(path)
    view = mask
    if permutation is not None:  # the groups are formed on kernel[inputs][:, outputs]
      if permutation.inputs is not None:
        view = view[np.asarray(permutation.inputs)]
      if permutation.outputs is not None:
        view = view[:, np.asarray(permutation.outputs)]
    assert ref.structure_ok(view, 16, 5), path
    assert not np.any(params[path][~mask]), f"{path}: pruned entries are not zero"
    assert mask.mean() > 0.3  # 2 of 5 kept, less a little for the 16-row padding


def test_pipeline_fixed_mask_keeps_the_one_shot_mask_and_trains(pipeline):
  for permuted in (False, True):
    one_shot = pipeline.seeds[0].models[("16:2:5", permuted, "one-shot")]
    tuned = pipeline.seeds[0].models[("16:2:5", permuted, "fixed-mask")]
    before, after = _kernels(one_shot.params), _kernels(tuned.params)
    for path, mask in _kernels(one_shot.masks).items():
      np.testing.assert_array_equal(_kernels(tuned.masks)[path], mask)
      assert not np.allclose(after[path][mask], before[path][mask])  # kept weights moved


def test_pipeline_fine_tunings_have_the_same_budget_as_the_dense_baseline(pipeline):
  seed = pipeline.seeds[0]
  steps = (64 // 32) * 1  # train_images // batch_size * fine-tuning epochs
  assert seed.same_budget_steps == steps
  assert [r.steps for r in seed.variants] == [0, steps, steps] * 2  # one-shot trains nothing
  for a, b in zip(jax.tree.leaves(seed.same_budget_params), jax.tree.leaves(seed.dense_params)):
    assert a.shape == b.shape
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seed.same_budget_params),
                                                      jax.tree.leaves(seed.dense_params)))


def test_permutation_indices_round_trip():
  graphdef, params = vit_training.init_model(TINY, seed=0)
  names = list(_kernels(params))
  qkv, out = "blocks/0/attention/qkv/kernel", "blocks/0/attention/out/kernel"
  rng = np.random.default_rng(0)
  inputs, outputs = rng.permutation(16), rng.permutation(48)
  indices = vit_pipeline.permutation_indices(params, names, {qkv: Permutation(inputs, outputs)})
  moved = tree_permute(params, indices)
  np.testing.assert_array_equal(_kernels(moved)[qkv], _kernels(params)[qkv][inputs][:, outputs])
  np.testing.assert_array_equal(_kernels(moved)[out], _kernels(params)[out])
  back = tree_unpermute(moved, indices)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pipeline_rejects_unknown_preset(tmp_path):
  with pytest.raises(ValueError, match="preset"):
    vit_pipeline.run_pipeline("huge", tmp_path)
