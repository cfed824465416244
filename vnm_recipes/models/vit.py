"""A DeiT-style Vision Transformer in Flax NNX.

Images (batch, height, width, channels) are cut into non-overlapping square patches, each
flattened and projected to `dim` features; a learned class token is prepended and learned
position embeddings (initialised from a 2D sine-cosine table) are added. Pre-norm blocks follow (LayerNorm -> multi-head
self-attention -> residual, LayerNorm -> GELU MLP -> residual), then a final LayerNorm
and a linear classifier on the class token.

Every projection is an `nnx.Linear` with a 2D (in_features, out_features) kernel,
including the fused query/key/value projection (dim, 3 * dim), so the library's V:N:M
masks apply to each kernel as it is: M groups along the inputs (axis 0), V blocks along
the outputs (axis 1). `prunable_kernel_paths` names the kernels a DeiT recipe prunes
(those inside the transformer blocks; `PRUNABLE_PATTERN` is the same set as a path regex).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_recipes.checks import check_positive_int, check_positive_ints

# The kernels of `prunable_kernel_paths`, as a path regex (`vnm_jax.tree_masks(filter=...)`).
PRUNABLE_PATTERN = r"^blocks/\d+/(attention/(qkv|out)|mlp/fc[12])/kernel$"


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of a `ViT`.

  Attributes:
    image_size: height and width of the (square) input images in pixels.
    patch_size: side of a square patch; must divide image_size.
    channels: input channels.
    num_classes: classifier outputs.
    dim: token width; must be divisible by num_heads.
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    dropout: dropout rate on attention weights, MLP hidden units and residual branches
      during training (0 disables it).
  """

  image_size: int = 8
  patch_size: int = 2
  channels: int = 1
  num_classes: int = 10
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  dropout: float = 0.0

  def __post_init__(self):
    check_positive_ints(self, ("image_size", "patch_size", "channels", "num_classes", "dim",
                               "depth", "num_heads", "mlp_dim"))
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.patch_size ({self.patch_size}) must divide image_size "
                       f"({self.image_size})")
    if self.dim % 4:
      raise ValueError(f"ViTConfig.dim must be divisible by 4 (2D position table), got {self.dim}")
    if self.dim % self.num_heads:
      raise ValueError(f"ViTConfig.num_heads ({self.num_heads}) must divide dim ({self.dim})")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"ViTConfig.dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_features(self) -> int:
    """Length of one flattened patch: patch_size * patch_size * channels."""
    return self.patch_size * self.patch_size * self.channels


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts images into flattened non-overlapping patches, row-major over the patch grid.

  Args:
    images: (batch, height, width, channels); height and width divisible by patch_size.
    patch_size: side of a square patch.

  Returns:
    (batch, (height // p) * (width // p), p * p * channels); each patch flattened in
    (row, column, channel) order.
  """
  b, h, w, c = images.shape
  p = patch_size
  grid = images.reshape(b, h // p, p, w // p, p, c)
  return grid.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


def sincos_position_embedding(grid_size: int, dim: int) -> np.ndarray:
  """2D sine-cosine position table for a class token plus a grid_size x grid_size grid.

  Half of the features encode the patch row, half the column, each as sines and cosines
  at dim // 4 geometric frequencies; the class token's row is zero.

  Returns:
    float32 (1, 1 + grid_size**2, dim); patches in row-major order as `patchify`.
  """
  if dim % 4:
    raise ValueError(f"dim must be divisible by 4 for a 2D sine-cosine table, got {dim}")
  quarter = dim // 4
  frequencies = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  angles = np.arange(grid_size)[:, None] * frequencies[None, :]
  axis_table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (grid, dim/2)
  rows = np.repeat(axis_table, grid_size, axis=0)
  columns = np.tile(axis_table, (grid_size, 1))
  table = np.concatenate([np.zeros((1, dim)), np.concatenate([rows, columns], axis=1)])
  return table[None].astype(np.float32)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when key is None (evaluation) or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused (dim, 3 * dim) query/key/value projection.

  The qkv kernel's outputs are ordered [query | key | value], each split into
  num_heads contiguous slices of dim // num_heads.
  """

  def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.dropout = dropout
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
    b, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, t, heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    weights = _dropout(jax.nn.softmax(logits, axis=-1), self.dropout, key)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return self.out(mixed)


class MLP(nnx.Module):
  """Linear(dim, mlp_dim) -> GELU -> dropout -> Linear(mlp_dim, dim).

  GELU is jax's tanh approximation unless approximate_gelu is False (the exact erf form
  of pretrained PyTorch models such as DINOv2).
  """

  def __init__(self, dim: int, mlp_dim: int, dropout: float, *, approximate_gelu: bool = True,
               rngs: nnx.Rngs):
    self.dropout = dropout
    self.approximate_gelu = approximate_gelu
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x: (..., dim) -> (..., dim)."""
    hidden = jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu)
    hidden = _dropout(hidden, self.dropout, key)
    return self.fc2(hidden)


class Block(nnx.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.dropout = config.dropout
    self.norm1 = nnx.LayerNorm(config.dim, rngs=rngs)
    self.attention = Attention(config.dim, config.num_heads, config.dropout, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.dim, rngs=rngs)
    self.mlp = MLP(config.dim, config.mlp_dim, config.dropout, rngs=rngs)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    x = x + _dropout(self.attention(self.norm1(x), keys[0]), self.dropout, keys[1])
    return x + _dropout(self.mlp(self.norm2(x), keys[2]), self.dropout, keys[3])


class ViT(nnx.Module):
  """DeiT-style Vision Transformer classifier (see the module docstring)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.truncated_normal(stddev=0.02)
    self.patch_embedding = nnx.Linear(config.patch_features, config.dim, rngs=rngs)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, config.dim)))
    # Learned, but started from a 2D sine-cosine table: with ~1.4k training images a
    # random start leaves the model to discover the patch grid and costs many epochs.
    self.position_embedding = nnx.Param(jnp.asarray(sincos_position_embedding(
        config.image_size // config.patch_size, config.dim)))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.dim, rngs=rngs)
    self.head = nnx.Linear(config.dim, config.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Classifies a batch of images.

    Args:
      images: (batch, image_size, image_size, channels).
      dropout_key: PRNG key enabling dropout (training); None runs deterministically.

    Returns:
      Logits, (batch, num_classes).
    """
    c = self.config
    expected = (c.image_size, c.image_size, c.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must have shape (batch, {', '.join(map(str, expected))}), "
                       f"got {tuple(images.shape)}")
    tokens = self.patch_embedding(patchify(images, c.patch_size))
    cls = jnp.broadcast_to(self.cls_token[...], (tokens.shape[0], 1, c.dim))
    x = jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)
    x = x + self.position_embedding[...]
    keys = ([None] * c.depth if dropout_key is None
            else list(jax.random.split(dropout_key, c.depth)))
    for block, key in zip(self.blocks, keys):
      x = block(x, key)
    return self.head(self.norm(x[:, 0]))


def prunable_kernel_paths(config: ViTConfig) -> tuple[tuple[str | int, ...], ...]:
  """Paths (as in `nnx.state(model)`) of the block kernels a DeiT recipe prunes.

  The patch embedding (4 inputs) and the classifier head stay dense, as in DeiT pruning
  recipes: they hold a negligible share of the FLOPs and are the most sensitive layers.

  Returns:
    One tuple per kernel, e.g. ("blocks", 0, "attention", "qkv", "kernel").
  """
  paths = []
  for i in range(config.depth):
    paths.append(("blocks", i, "attention", "qkv", "kernel"))
    paths.append(("blocks", i, "attention", "out", "kernel"))
    paths.append(("blocks", i, "mlp", "fc1", "kernel"))
    paths.append(("blocks", i, "mlp", "fc2", "kernel"))
  return tuple(paths)


def gemm_shapes(config: ViTConfig, batch_size: int) -> dict[str, tuple[int, int, int]]:
  """(rows, in_features, out_features) of each distinct pruned GEMM for one batch.

  rows = batch_size * (num_patches + 1) tokens; every block has the same four GEMMs.
  """
  check_positive_int("batch_size", batch_size)
  tokens = batch_size * (config.num_patches + 1)
  return {
      "qkv": (tokens, config.dim, 3 * config.dim),
      "out": (tokens, config.dim, config.dim),
      "fc1": (tokens, config.dim, config.mlp_dim),
      "fc2": (tokens, config.mlp_dim, config.dim),
  }
