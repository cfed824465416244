"""A Llama-architecture decoder-only language model in Flax NNX.

Token embedding, then `num_layers` pre-norm blocks (RMSNorm -> grouped-query attention
with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual), a final
RMSNorm and a language-model head (tied to the embedding or a separate kernel). This is
the architecture of Llama 2/3 and of SmolLM2.

Every projection is a bias-free `nnx.Linear` with a 2D (in_features, out_features) kernel,
so the library's V:N:M masks apply to each kernel as it is: M groups along the inputs
(axis 0), V blocks along the outputs (axis 1). `prunable_kernel_paths` names the seven
kernels per block that a pruning recipe prunes (`PRUNABLE_PATTERN` is the same set as a
path regex for `vnm_jax`'s tree functions); the embedding and head stay dense.
`llama_gemm_shapes` lists their (in, out) shapes for V/M selection.

Rotary embeddings use the "rotate half" pairing of Hugging Face's Llama: within each head
of width D, feature i is rotated together with feature i + D/2 by the angle
position * rope_base ** (-2i / D). (llama.cpp pairs adjacent features instead and
stores its query/key rows permuted to match; `vnm_recipes.gguf` undoes that permutation.)

Shapes: tokens are int (batch, length); logits are float32 (batch, length, vocab_size) for
any parameter dtype (the head accumulates in float32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vnm_recipes.checks import check_positive_int, check_positive_ints

# Paths end in .../<module>/<name>/kernel; these names hold the block GEMMs.
ATTENTION_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEAR_NAMES = ("gate_proj", "up_proj", "down_proj")
# The kernels of `prunable_kernel_paths`, as a path regex (`vnm_jax.tree_masks(filter=...)`).
PRUNABLE_PATTERN = r"^layers/\d+/(attention|mlp)/\w+_proj/kernel$"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a `Llama`.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: width of the residual stream.
    intermediate_size: hidden width of each block's SwiGLU MLP.
    num_layers: number of decoder blocks.
    num_heads: query heads per block.
    num_kv_heads: key/value heads per block; must divide num_heads (grouped-query
      attention: each key/value head serves num_heads // num_kv_heads query heads).
    head_dim: width of one head; must be even (RoPE rotates feature pairs).
    rope_base: RoPE frequency base (10000 in Llama 2, 100000 in SmolLM2-135M).
    rms_norm_eps: epsilon inside every RMSNorm.
    tie_embeddings: if True the head reuses the token embedding (logits = h @ E^T);
      otherwise it is its own (hidden_size, vocab_size) kernel.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True

  def __post_init__(self):
    check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                               "num_heads", "num_kv_heads", "head_dim"))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_kv_heads ({self.num_kv_heads}) must divide "
                       f"num_heads ({self.num_heads})")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even (RoPE rotates pairs), got "
                       f"{self.head_dim}")
    if not self.rope_base > 1.0:
      raise ValueError(f"LlamaConfig.rope_base must be > 1, got {self.rope_base!r}")
    if not self.rms_norm_eps > 0.0:
      raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

  @classmethod
  def smollm2_135m(cls) -> LlamaConfig:
    """The sizes of SmolLM2-135M (30 blocks, hidden 576, 9 query / 3 key-value heads)."""
    return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_base=100000.0,
               rms_norm_eps=1e-5, tie_embeddings=True)


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> jax.Array:
  """Rotation angles of rotary embeddings.

  Args:
    positions: int (..., length) token positions.
    head_dim: even head width D.
    base: frequency base.

  Returns:
    float32 (..., length, D // 2): angle[..., t, i] = positions[..., t] * base**(-2i/D).
  """
  inverse_frequencies = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return positions[..., None].astype(jnp.float32) * inverse_frequencies


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotates feature pairs (i, i + D/2) of every head by its position's angles.

  Args:
    x: (batch, length, heads, D) queries or keys.
    positions: int (batch, length) or (length,) positions of the tokens.
    base: frequency base.

  Returns:
    Array like x.
  """
  head_dim = x.shape[-1]
  angles = rope_angles(positions, head_dim, base)
  angles = jnp.broadcast_to(angles, x.shape[:2] + angles.shape[-1:])[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  first, second = x32[..., :head_dim // 2], x32[..., head_dim // 2:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class LayerCache(NamedTuple):
  """Keys and values of one block for positions 0 .. capacity - 1.

  Attributes:
    keys: (batch, capacity, num_kv_heads, head_dim), after RoPE.
    values: (batch, capacity, num_kv_heads, head_dim).
  """

  keys: jax.Array
  values: jax.Array


class KVCache(NamedTuple):
  """Key/value cache of a whole model for incremental decoding (a pytree).

  Attributes:
    layers: one `LayerCache` per block.
    length: int32 scalar, number of positions already written (the next token's position).
  """

  layers: tuple[LayerCache, ...]
  length: jax.Array


class Attention(nnx.Module):
  """Grouped-query causal self-attention with rotary embeddings.

  Query head h uses key/value head h // (num_heads // num_kv_heads). Kernels:
  q_proj (hidden, num_heads * D), k_proj and v_proj (hidden, num_kv_heads * D),
  o_proj (num_heads * D, hidden); the outputs of q/k/v are head-major (head h holds
  features h*D .. h*D + D - 1).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rope_base = config.rope_base
    d, hd = config.hidden_size, config.head_dim
    self.q_proj = nnx.Linear(d, config.num_heads * hd, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(d, config.num_kv_heads * hd, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(d, config.num_kv_heads * hd, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(config.num_heads * hd, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Attends each token to itself and to earlier tokens.

    Args:
      x: (batch, length, hidden) normalised inputs.
      positions: int32 (length,) absolute positions of the tokens, consecutive.
      cache: None (the tokens are the whole sequence) or the keys/values of earlier
        positions; the new keys/values are written at `positions` and every cached
        position <= a token's position is attended to.

    Returns:
      (batch, length, hidden) outputs and the updated cache (None without a cache).
    """
    b, t, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, self.rope_base)
    k = apply_rope(k, positions, self.rope_base)
    if cache is None:
      key_positions = positions
    else:
      start = (0, positions[0], 0, 0)
      cache = LayerCache(jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype),
                                                      start),
                         jax.lax.dynamic_update_slice(cache.values,
                                                      v.astype(cache.values.dtype), start))
      k, v = cache.keys, cache.values
      key_positions = jnp.arange(k.shape[1])
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
    causal = key_positions[None, :] <= positions[:, None]  # (t, s)
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    mixed = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return self.o_proj(mixed.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., hidden) -> (..., hidden)."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
  """x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps,
                                      rngs=rngs)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x: (batch, length, hidden) -> same shape, and the updated cache (see Attention)."""
    attended, cache = self.attention(self.attention_norm(x), positions, cache)
    x = x + attended
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """Llama-architecture causal language model (see the module docstring)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, rngs=rngs)
    self.lm_head = (None if config.tie_embeddings else
                    nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                               rngs=rngs))

  def _check_tokens(self, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array of shape (batch, length), got dtype "
                       f"{tokens.dtype} and shape {tuple(tokens.shape)}")

  def _logits(self, x: jax.Array) -> jax.Array:
    """float32 logits whatever the parameter dtype: a bf16 model's loss and perplexity are
    taken on logits accumulated in float32 (a bf16 logit of 30 is only good to 0.125)."""
    x = self.final_norm(x)
    if self.lm_head is None:
      head = self.embed.embedding[...].T
    elif isinstance(self.lm_head, nnx.Linear):
      head = self.lm_head.kernel[...]
    else:  # a replaced head (e.g. a compressed layer) computes its own product
      return self.lm_head(x).astype(jnp.float32)
    return jnp.matmul(x, head, preferred_element_type=jnp.float32).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits of whole sequences (no cache).

    Args:
      tokens: int (batch, length), positions 0 .. length - 1.

    Returns:
      float32 (batch, length, vocab_size): logits[:, t] scores the token at position t + 1.
    """
    self._check_tokens(tokens)
    x = self.embed(tokens)
    positions = jnp.arange(tokens.shape[1])
    for layer in self.layers:
      x, _ = layer(x, positions)
    return self._logits(x)

  def init_cache(self, batch_size: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `capacity` tokens.

    dtype defaults to the embedding's dtype.
    """
    c = self.config
    dtype = self.embed.embedding[...].dtype if dtype is None else dtype
    shape = (batch_size, capacity, c.num_kv_heads, c.head_dim)
    layer = LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return KVCache(tuple(layer for _ in range(c.num_layers)), jnp.zeros((), jnp.int32))

  def decode(self, tokens: jax.Array, cache: KVCache, *,
             last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Logits of tokens that continue the cached sequences.

    Args:
      tokens: int (batch, length), at positions cache.length .. cache.length + length - 1
        (a whole prompt, or one new token per step). Positions past the cache capacity
        are silently dropped by the cache update, so size the cache for the whole run.
      cache: from `init_cache` or an earlier `decode`.
      last_only: if True, only the last token's logits are computed (what generation
        needs after a prompt: the head, a vocab_size-wide matmul, then runs on one
        token instead of the whole prompt).

    Returns:
      (batch, length, vocab_size) logits ((batch, 1, vocab_size) if last_only) and the
      cache holding the new positions too.
    """
    self._check_tokens(tokens)
    x = self.embed(tokens)
    positions = cache.length + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    new_layers = []
    for layer, layer_cache in zip(self.layers, cache.layers):
      x, layer_cache = layer(x, positions, layer_cache)
      new_layers.append(layer_cache)
    if last_only:
      x = x[:, -1:]
    return self._logits(x), KVCache(tuple(new_layers), cache.length + tokens.shape[1])


def prunable_kernel_paths(config: LlamaConfig) -> tuple[tuple[str | int, ...], ...]:
  """Paths (as in `nnx.state(model)`) of the block kernels a pruning recipe prunes.

  The seven projections of every block (q, k, v, o, gate, up, down), as in Wanda/RIA;
  the embedding and the (tied) head stay dense.

  Returns:
    One tuple per kernel, e.g. ("layers", 0, "attention", "q_proj", "kernel").
  """
  paths = []
  for i in range(config.num_layers):
    paths.extend(("layers", i, "attention", name, "kernel") for name in ATTENTION_LINEAR_NAMES)
    paths.extend(("layers", i, "mlp", name, "kernel") for name in MLP_LINEAR_NAMES)
  return tuple(paths)


def llama_gemm_shapes(config: LlamaConfig) -> dict[tuple[int, int], int]:
  """{(in, out): count} of the prunable kernels of a `Llama` (for `vnm_jax.select_vm`).

  Per block: q (hidden, heads*head_dim), k and v (hidden, kv_heads*head_dim), o
  (heads*head_dim, hidden), gate and up (hidden, ffn), down (ffn, hidden); the same
  as `vnm_jax.model_gemm_shapes` of the model, without building it.
  """
  hidden, ffn = config.hidden_size, config.intermediate_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  shapes: dict[tuple[int, int], int] = {}
  for shape in [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, ffn),
                (hidden, ffn), (ffn, hidden)]:
    shapes[shape] = shapes.get(shape, 0) + config.num_layers
  return shapes


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id"))
def _generate(graphdef, state, prompt, max_new_tokens, eos_id):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
  logits, cache = model.decode(prompt, cache, last_only=True)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    token, cache, finished = carry
    logits, cache = model.decode(token[:, None], cache)
    following = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    if eos_id is not None:
      finished = finished | (token == eos_id)
      following = jnp.where(finished, eos_id, following)
    return (following, cache, finished), token

  finished = jnp.zeros(prompt.shape[0], bool)
  (last, _, _), tokens = jax.lax.scan(step, (first, cache, finished), None,
                                      length=max_new_tokens - 1)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate_greedy(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *,
                    eos_id: int | None = None) -> jax.Array:
  """Greedy (argmax) continuation with a key/value cache, compiled as one program.

  Args:
    model: a `Llama` (or any module with the same `init_cache` / `decode` / `embed`).
    prompt: int (batch, length) token ids, length >= 1.
    max_new_tokens: number of tokens to generate, >= 1.
    eos_id: if given, a sequence that produced this token keeps producing it.

  Returns:
    int32 (batch, max_new_tokens) generated token ids (the prompt is not included).
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be an int array of shape (batch, length >= 1), got dtype "
                     f"{prompt.dtype} and shape {tuple(prompt.shape)}")
  check_positive_int("max_new_tokens", max_new_tokens)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt.astype(jnp.int32), max_new_tokens, eos_id)
