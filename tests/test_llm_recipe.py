"""The LLM recipe (vnm_recipes.llm) end to end on a 2-layer random Llama (no download)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from vnm_jax import (Permutation, VNMConfig, VNMLinear, collect_input_norms, is_vnm, path_str,
                     tree_masks)
from vnm_jax.permutation import permute
from vnm_recipes import gguf as vnm_gguf
from vnm_recipes.data.text import calibration_batches, training_batch
from vnm_recipes.llm import cli as llm_cli
from vnm_recipes.llm import compression, pruning, training
from vnm_recipes.llm.evaluation import token_nll
from vnm_recipes.llm.presets import LoRASettings
from vnm_recipes.models.llama import (PRUNABLE_PATTERN, Llama, LlamaConfig, generate_greedy,
                                      prunable_kernel_paths)
from vnm_reference import column_l1_mask

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_base=100.0)
CONFIG = VNMConfig.parse("8:2:5")  # M = 5 does not divide 32 or 48: groups are padded.
SETTINGS = LoRASettings(steps=6, batch_size=2, sequence_length=16, rank=4,
                        learning_rate=1e-2, update_every=1)


@pytest.fixture(scope="module")
def setup():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  # A stream with structure (a noisy repeating phrase), so training has something to learn.
  rng = np.random.default_rng(0)
  phrase = rng.integers(0, TINY.vocab_size, 23)
  tokens = np.tile(phrase, 200)
  noise = rng.random(tokens.size) < 0.1
  tokens[noise] = rng.integers(0, TINY.vocab_size, noise.sum())
  batches = calibration_batches(tokens, 4, 32, 2)
  norms = collect_input_norms(model, [jnp.asarray(b) for b in batches], filter=PRUNABLE_PATTERN,
                              progress=False)
  return model, tokens.astype(np.int32), batches, norms


@pytest.fixture(scope="module")
def lora_run(setup):
  model, tokens, _, norms = setup
  rng = np.random.default_rng(1)
  permutations = {"/".join(map(str, path)): Permutation(rng.permutation(k.shape[0]),
                                                        rng.permutation(k.shape[1]))
                  for path, k in zip(prunable_kernel_paths(TINY),
                                     _kernels(model).values())}
  result = training.train_three_stage_lora(model, tokens, CONFIG, SETTINGS, input_norms=norms,
                                           permutations=permutations, progress=False)
  return result, permutations


def _kernels(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(_get(model, path)[...])
          for path in prunable_kernel_paths(model.config)}


def _get(node, path):
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def test_calibration_norms_match_numpy(setup):
  model, _, batches, norms = setup
  # q_proj of block 0 sees RMSNorm(embedding(tokens)) over every calibration token.
  x = np.asarray(model.embed.embedding[...])[np.concatenate(batches).ravel()]
  x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + TINY.rms_norm_eps)
  x = x * np.asarray(model.layers[0].attention_norm.scale[...])
  np.testing.assert_allclose(norms["layers/0/attention/q_proj/kernel"],
                             np.sqrt((x * x).sum(axis=0)), rtol=1e-4)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "ria"])
def test_one_shot_masks_match_numpy_reference(setup, score):
  model, _, _, norms = setup
  params = nnx.state(model)
  masks, permutations = pruning.one_shot_masks(params, CONFIG, score, norms, permuted=False)
  assert permutations is None
  found = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda x: x is None)[0] if m is not None}
  assert sorted(found) == sorted(_kernels(model))
  for path, kernel in _kernels(model).items():
    w = np.abs(kernel.astype(np.float64))
    n = np.asarray(norms[path], np.float64)[:, None]
    expected_scores = {"magnitude": w, "wanda": w * n,
                       "ria": (w / w.sum(1, keepdims=True) + w / w.sum(0, keepdims=True))
                       * np.sqrt(n)}[score]
    np.testing.assert_array_equal(np.asarray(found[path]),
                                  column_l1_mask(expected_scores, CONFIG.v, CONFIG.m),
                                  err_msg=f"{score} {path}")


def test_permuted_one_shot_masks_keep_more_score(setup):
  model, _, _, norms = setup
  path = "layers/0/mlp/up_proj/kernel"
  scores = {path: pruning.kernel_scores(nnx.state(model), "wanda", norms)[path]}
  permutations = pruning.search_permutations(scores, CONFIG, seconds_per_kernel=0.5)
  permutation = permutations[path]
  s = np.asarray(scores[path], np.float64)
  plain = column_l1_mask(s, CONFIG.v, CONFIG.m)
  permuted = column_l1_mask(np.asarray(permute(s, permutation)), CONFIG.v, CONFIG.m)
  assert s[plain].sum() < np.asarray(permute(s, permutation))[permuted].sum()
  mask = np.asarray(tree_masks({path: scores[path]}, CONFIG, filter=PRUNABLE_PATTERN,
                               scores={path: scores[path]}, permutations=permutations)[path])
  assert is_vnm(mask, CONFIG, permutation=permutation)
  np.testing.assert_array_equal(np.asarray(permute(mask, permutation)), permuted)


def test_reparametrisation_is_exact_and_stored_magnitude_is_wanda(setup):
  model, _, _, norms = setup
  params = nnx.state(model)
  path = "layers/1/mlp/down_proj/kernel"
  k = _kernels(model)[path]
  perm = Permutation(np.roll(np.arange(k.shape[0]), 3), np.arange(k.shape[1])[::-1].copy())
  scales = training.lora_scales(params, "wanda", norms)
  reparam = training.Reparametrisation(scales, {path: perm})
  stored = reparam.to_stored(params)
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
  wanda = np.abs(k) * np.asarray(norms[path])[:, None]
  # |stored| is the permuted Wanda score up to one positive factor per kernel.
  ratio = np.abs(np.asarray(flat[path])) / np.asarray(permute(wanda, perm))
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
  back = reparam.to_model(stored)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(back)[0],
                       jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7,
                               err_msg=path_str(p))


def test_lora_starts_at_the_dense_model_and_learns(setup, lora_run):
  model, tokens, _, _ = setup
  result, _ = lora_run
  first = training_batch(tokens, np.random.default_rng(SETTINGS.seed), SETTINGS.batch_size,
                         SETTINGS.sequence_length)
  dense_loss = float(jnp.mean(token_nll(model(jnp.asarray(first)), jnp.asarray(first))))
  # Stage 1 starts with b = 0 and an all-ones mask: the loss is the dense model's.
  assert result.losses[0] == pytest.approx(dense_loss, rel=1e-5)
  assert len(result.losses) == SETTINGS.steps and np.all(np.isfinite(result.losses))
  assert result.tokens == SETTINGS.steps * SETTINGS.batch_size * SETTINGS.sequence_length


def test_merged_kernels_are_vnm_under_their_permutations(setup, lora_run):
  model, _, _, _ = setup
  result, permutations = lora_run
  merged = _kernels(nnx.merge(nnx.graphdef(model), result.params))
  assert sorted(result.masks) == sorted(merged)
  for path, kernel in merged.items():
    mask = np.asarray(result.masks[path])
    assert is_vnm(mask, CONFIG, permutation=permutations[path]), path
    assert not is_vnm(mask, CONFIG), path  # the permutation matters for these masks
    assert np.all(kernel[~mask] == 0), path
    assert np.count_nonzero(kernel) > 0.9 * mask.sum(), path
  # Dense leaves (embedding, norms) are untouched by the merge.
  np.testing.assert_array_equal(
      np.asarray(result.params["embed"]["embedding"][...]), np.asarray(model.embed.embedding[...]))


def test_compressed_model_equals_masked_model(setup, lora_run):
  model, tokens, _, _ = setup
  result, permutations = lora_run
  merged = nnx.merge(nnx.graphdef(model), result.params)
  compressed = compression.compress_llama(merged, CONFIG, result.masks, permutations)
  layers = [m for _, m in nnx.iter_graph(compressed) if isinstance(m, VNMLinear)]
  assert len(layers) == len(prunable_kernel_paths(TINY))
  check = compression.compression_check(merged, compressed, tokens[None, :40])
  assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["max_abs_logit"])
  assert check["argmax_agreement"] == 1.0
  prompt = tokens[None, :5]
  np.testing.assert_array_equal(np.asarray(generate_greedy(compressed, prompt, 8)),
                                np.asarray(generate_greedy(merged, prompt, 8)))
  stored, dense = compression.compressed_bytes(compressed)
  assert stored < dense


def test_safetensors_export_has_gguf_names_and_layout(setup, lora_run, tmp_path):
  model, _, _, _ = setup
  result, _ = lora_run
  merged = nnx.merge(nnx.graphdef(model), result.params)
  path = vnm_gguf.save_safetensors(merged, tmp_path / "pruned.safetensors",
                                   metadata={"vnm_pattern": str(CONFIG)})
  loaded = load_file(str(path))
  kernels = _kernels(merged)
  np.testing.assert_array_equal(loaded["blk.1.ffn_down.weight"],
                                kernels["layers/1/mlp/down_proj/kernel"].T)
  q = vnm_gguf.llamacpp_to_rotate_half_rows(loaded["blk.0.attn_q.weight"], TINY.num_heads)
  np.testing.assert_array_equal(q, kernels["layers/0/attention/q_proj/kernel"].T)


def test_lora_settings_and_inputs_are_validated(setup):
  model, tokens, _, _ = setup
  with pytest.raises(ValueError, match="mask_score"):
    LoRASettings(mask_score="ria")
  with pytest.raises(ValueError, match="steps"):
    LoRASettings(steps=0)
  with pytest.raises(ValueError, match="input_norms"):
    training.train_three_stage_lora(model, tokens, CONFIG, SETTINGS, progress=False)
  with pytest.raises(ValueError, match="calibration windows"):
    calibration_batches(tokens[:100], 4, 32, 2)
  assert SETTINGS.stage_steps() == (1, 1)
  assert LoRASettings(steps=200).stage_steps() == (10, 10)


def test_report_prints_the_gap_to_dense(tmp_path, capsys):
  results = tmp_path / "results.jsonl"
  results.write_text('{"recipe": "dense", "eval_tokens": 512, "ppl": 10.0, "nll": 2.5}\n'
                     '{"recipe": "one-shot", "pattern": "64:2:5", "score": "wanda", '
                     '"permuted": false, "eval_tokens": 512, "ppl": 100.0, "nll": 4.0}\n')
  assert llm_cli.main(["report", "--results", str(results)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == "| one-shot | 64:2:5 | wanda | False | 512 | 100 | 4.0000 | 1.500 |"
