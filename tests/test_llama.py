"""Tests of the nnx Llama against an independent numpy forward pass (tiny random models)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vnm_jax import model_gemm_shapes, path_str
from vnm_reference import assert_close
from vnm_recipes.models.llama import (PRUNABLE_PATTERN, KVCache, Llama, LlamaConfig, apply_rope,
                                      generate_greedy, llama_gemm_shapes, prunable_kernel_paths)

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_base=100.0, rms_norm_eps=1e-5)


def reference_logits(weights: dict, config: LlamaConfig, tokens: np.ndarray,
                     pairing: str) -> np.ndarray:
  """Llama forward pass in float64 numpy, one sequence, explicit loops over heads and pairs.

  Args:
    weights: GGUF names -> arrays; matrices (out_features, in_features).
    config: sizes.
    tokens: int (length,).
    pairing: "half" rotates features (i, i + D/2) of a head together (Hugging Face order),
      "adjacent" rotates (2i, 2i + 1) (llama.cpp order).

  Returns:
    (length, vocab) logits.
  """
  w = {name: np.asarray(array, np.float64) for name, array in weights.items()}
  d, t = config.head_dim, len(tokens)
  groups = config.num_heads // config.num_kv_heads

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps) * scale

  def rope(x):  # x: (length, D) of one head
    out = x.copy()
    for i in range(d // 2):
      a, b = (i, i + d // 2) if pairing == "half" else (2 * i, 2 * i + 1)
      for pos in range(t):
        angle = pos * config.rope_base ** (-2.0 * i / d)
        c, s = np.cos(angle), np.sin(angle)
        out[pos, a] = x[pos, a] * c - x[pos, b] * s
        out[pos, b] = x[pos, b] * c + x[pos, a] * s
    return out

  x = w["token_embd.weight"][tokens]
  for layer in range(config.num_layers):
    p = f"blk.{layer}."
    h = rms_norm(x, w[p + "attn_norm.weight"])
    q, k, v = (h @ w[p + name].T for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight"))
    heads = []
    for head in range(config.num_heads):
      kv = head // groups
      qh = rope(q[:, head * d:(head + 1) * d])
      kh = rope(k[:, kv * d:(kv + 1) * d])
      vh = v[:, kv * d:(kv + 1) * d]
      scores = qh @ kh.T / np.sqrt(d)
      scores[np.triu_indices(t, 1)] = -np.inf
      probs = np.exp(scores - scores.max(axis=1, keepdims=True))
      heads.append(probs / probs.sum(axis=1, keepdims=True) @ vh)
    x = x + np.concatenate(heads, axis=1) @ w[p + "attn_output.weight"].T
    h = rms_norm(x, w[p + "ffn_norm.weight"])
    gate = h @ w[p + "ffn_gate.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ \
        w[p + "ffn_down.weight"].T
  x = rms_norm(x, w["output_norm.weight"])
  return x @ w.get("output.weight", w["token_embd.weight"]).T


def random_model(config: LlamaConfig = TINY, seed: int = 0) -> Llama:
  """A Llama with random kernels and random (not all-ones) norm scales."""
  model = Llama(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for norm in [model.final_norm] + [n for layer in model.layers
                                    for n in (layer.attention_norm, layer.mlp_norm)]:
    norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32))
  return model


def half_pairing_weights(model: Llama) -> dict:
  """The model's parameters under GGUF names, (out, in), rows in the model's own order."""
  arr = lambda v: np.asarray(v[...])  # noqa: E731
  weights = {"token_embd.weight": arr(model.embed.embedding),
             "output_norm.weight": arr(model.final_norm.scale)}
  if model.lm_head is not None:
    weights["output.weight"] = arr(model.lm_head.kernel).T
  for i, layer in enumerate(model.layers):
    a, m = layer.attention, layer.mlp
    weights.update({
        f"blk.{i}.attn_norm.weight": arr(layer.attention_norm.scale),
        f"blk.{i}.ffn_norm.weight": arr(layer.mlp_norm.scale),
        f"blk.{i}.attn_q.weight": arr(a.q_proj.kernel).T,
        f"blk.{i}.attn_k.weight": arr(a.k_proj.kernel).T,
        f"blk.{i}.attn_v.weight": arr(a.v_proj.kernel).T,
        f"blk.{i}.attn_output.weight": arr(a.o_proj.kernel).T,
        f"blk.{i}.ffn_gate.weight": arr(m.gate_proj.kernel).T,
        f"blk.{i}.ffn_up.weight": arr(m.up_proj.kernel).T,
        f"blk.{i}.ffn_down.weight": arr(m.down_proj.kernel).T,
    })
  return weights


# Jitted entry points: eager op-by-op dispatch of a whole model is slow.
forward = nnx.jit(lambda model, tokens: model(tokens))
decode = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


def tokens_of(shape, seed=0, vocab=TINY.vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_numpy_reference(tie):
  config = dataclasses.replace(TINY, tie_embeddings=tie)
  model = random_model(config)
  tokens = tokens_of((2, 12))
  logits = forward(model, tokens)
  assert logits.shape == (2, 12, config.vocab_size)
  weights = half_pairing_weights(model)
  for row in range(2):
    expected = reference_logits(weights, config, np.asarray(tokens[row]), "half")
    assert_close(logits[row], expected, rtol=2e-4)


def test_reference_detects_wrong_pairing():
  # The two pairings must give different logits, or the pairing checks prove nothing.
  model = random_model()
  tokens = np.asarray(tokens_of((9,)))
  weights = half_pairing_weights(model)
  half = reference_logits(weights, TINY, tokens, "half")
  adjacent = reference_logits(weights, TINY, tokens, "adjacent")
  assert np.abs(half - adjacent).max() > 1e-2


def test_gqa_equals_mha_with_repeated_kv_heads():
  # Grouped-query attention == full multi-head attention whose key/value heads are copies.
  model = random_model()
  mha_config = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
  mha = random_model(mha_config)
  groups = TINY.num_heads // TINY.num_kv_heads
  mha_params = dict(nnx.to_flat_state(nnx.state(mha, nnx.Param)))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "k_proj" not in path and "v_proj" not in path:
      mha_params[path].set_value(variable[...])
  for gqa_layer, mha_layer in zip(model.layers, mha.layers):
    for name in ("k_proj", "v_proj"):
      kernel = np.asarray(getattr(gqa_layer.attention, name).kernel[...])
      heads = kernel.reshape(TINY.hidden_size, TINY.num_kv_heads, TINY.head_dim)
      repeated = np.repeat(heads, groups, axis=1).reshape(TINY.hidden_size, -1)
      getattr(mha_layer.attention, name).kernel.set_value(jnp.asarray(repeated))
  tokens = tokens_of((2, 12))
  assert_close(forward(model, tokens), forward(mha, tokens), rtol=1e-5)


def test_rope_matches_complex_rotation_and_is_relative():
  rng = np.random.default_rng(1)
  d, base = 8, 50.0
  x = rng.standard_normal((1, 6, 3, d)).astype(np.float32)
  positions = jnp.arange(6) + 3
  rotated = np.asarray(apply_rope(jnp.asarray(x), positions, base))
  # Pair (i, i + d/2) as one complex number, multiplied by exp(i * pos * base^(-2i/d)).
  z = x[..., :d // 2] + 1j * x[..., d // 2:]
  angles = np.asarray(positions)[:, None] * base ** (-np.arange(0, d, 2) / d)
  expected = z * np.exp(1j * angles)[None, :, None, :]
  np.testing.assert_allclose(rotated, np.concatenate([expected.real, expected.imag], -1),
                             rtol=1e-5, atol=1e-5)
  # Norm preserved; q.k depends only on the position difference.
  np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  q, k = jnp.asarray(x[:, :1, :1]), jnp.asarray(x[:, 1:2, :1])
  dots = [float(jnp.sum(apply_rope(q, jnp.array([m + s]), base) *
                        apply_rope(k, jnp.array([n + s]), base)))
          for m, n, s in ((5, 2, 0), (5, 2, 7), (5, 2, 40))]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits():
  model = random_model()
  tokens = tokens_of((2, 12))
  changed = tokens.at[:, 8:].set((tokens[:, 8:] + 5) % TINY.vocab_size)
  a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
  assert_close(a[:, :8], b[:, :8], rtol=1e-6)
  assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


def test_cached_decode_equals_full_forward():
  model = random_model()
  tokens = tokens_of((2, 10))
  cache = model.init_cache(batch_size=2, capacity=16)
  assert isinstance(cache, KVCache) and int(cache.length) == 0
  first, cache = decode(model, tokens[:, :6], cache)
  pieces = [first]
  for t in range(6, 10):
    logits, cache = decode(model, tokens[:, t:t + 1], cache)
    pieces.append(logits)
  assert int(cache.length) == 10
  assert_close(np.concatenate(pieces, axis=1), forward(model, tokens), rtol=1e-5)


def test_generate_greedy_equals_argmax_of_full_forward():
  # Teacher forcing the generated tokens: each must be the argmax after its prefix.
  model = random_model()
  prompt = tokens_of((2, 6), seed=3)
  generated = np.asarray(generate_greedy(model, prompt, 6))
  assert generated.shape == (2, 6) and generated.dtype == np.int32
  logits = np.asarray(forward(model, jnp.concatenate([prompt, jnp.asarray(generated)], 1)))
  np.testing.assert_array_equal(generated, np.argmax(logits[:, 5:11], axis=-1))


def test_generate_greedy_repeats_eos_after_it():
  model = random_model()
  prompt = tokens_of((2, 6), seed=4)
  free = np.asarray(generate_greedy(model, prompt, 6))
  eos = int(free[0, 1])
  stopped = np.asarray(generate_greedy(model, prompt, 6, eos_id=eos))
  np.testing.assert_array_equal(stopped[0, :2], free[0, :2])
  assert (stopped[0, 2:] == eos).all()


def test_prunable_kernel_paths_are_the_seven_block_kernels():
  model = random_model()
  paths = prunable_kernel_paths(TINY)
  assert len(paths) == 7 * TINY.num_layers
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path in paths:
    assert params[path][...].ndim == 2
  assert ("embed", "embedding") not in paths


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(TINY, num_kv_heads=3)
  with pytest.raises(ValueError, match="head_dim"):
    dataclasses.replace(TINY, head_dim=7)
  with pytest.raises(ValueError, match="hidden_size"):
    dataclasses.replace(TINY, hidden_size=0)
  model = random_model()
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate_greedy(model, jnp.zeros((1, 3), jnp.int32), 0)
  with pytest.raises(ValueError, match="prompt"):
    generate_greedy(model, jnp.zeros((1, 0), jnp.int32), 2)


def test_llama_gemm_shapes_match_the_model():
  small = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12)
  model = nnx.eval_shape(lambda: Llama(small, rngs=nnx.Rngs(0)))
  assert llama_gemm_shapes(small) == model_gemm_shapes(nnx.state(model))
  # SmolLM2-135M: q, o (576x576), k, v (576x192), gate, up (576x1536), down (1536x576).
  assert llama_gemm_shapes(LlamaConfig.smollm2_135m()) == {
      (576, 576): 60, (576, 192): 60, (576, 1536): 60, (1536, 576): 30}


def test_prunable_pattern_names_the_prunable_kernel_paths():
  small = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12)
  state = nnx.state(nnx.eval_shape(lambda: Llama(small, rngs=nnx.Rngs(0))))
  matched = sorted(p for p in (path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(
      state)[0]) if re.search(PRUNABLE_PATTERN, p))
  assert matched == sorted("/".join(map(str, p)) for p in prunable_kernel_paths(small))
