"""The LLM recipe (vnm_recipes.llm) end to end on a 2-layer random Llama (no download)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from vnm_jax import (Permutation, VNMConfig, VNMLinear, collect_input_norms, is_vnm, path_str,
                     tree_apply_masks, tree_masks)
from vnm_jax.allocation import average_density
from vnm_jax.permutation import permute
from vnm_recipes import gguf as vnm_gguf
from vnm_recipes.data.text import TokenSplit, calibration_batches, training_batch
from vnm_recipes.llm import allocation, compression, pruning, reports, study, training
from vnm_recipes.llm import cli as llm_cli
from vnm_recipes.llm.evaluation import token_nll
from vnm_recipes.llm.presets import LoRASettings
from vnm_recipes.models.llama import (PRUNABLE_PATTERN, Llama, LlamaConfig, generate_greedy,
                                      prunable_kernel_paths)
from vnm_reference import column_l1_mask

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_base=100.0)
CONFIG = VNMConfig.parse("8:2:5")  # M = 5 does not divide 32 or 48: groups are padded.
# batch_size 8: with 8 CPU devices (tests/conftest.py) the LoRA step is data-parallel.
SETTINGS = LoRASettings(steps=6, batch_size=8, sequence_length=16, rank=4,
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
    LoRASettings(mask_score="hessian")
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


def test_lora_data_parallel_over_8_devices_matches_one_device(setup, lora_run):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  model, tokens, _, norms = setup
  sharded, permutations = lora_run
  assert training.data_mesh(8).shape == {"data": 8} and training.data_mesh(1) is None
  assert training.data_mesh(6).shape == {"data": 6}  # the most devices dividing the batch
  single = training.train_three_stage_lora(model, tokens, CONFIG, SETTINGS, input_norms=norms,
                                           permutations=permutations, mesh=None, progress=False)
  assert (sharded.devices, single.devices) == (8, 1)
  np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-5)
  for path, mask in single.masks.items():
    np.testing.assert_array_equal(np.asarray(sharded.masks[path]), np.asarray(mask))
  for a, b in zip(jax.tree_util.tree_leaves(sharded.params),
                  jax.tree_util.tree_leaves(single.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max()))


def test_bfloat16_base_keeps_float32_logits_loss_and_adapters(setup):
  model, tokens, _, norms = setup
  assert training.default_dtype("gpu") == jnp.bfloat16
  assert training.default_dtype("cpu") == jnp.float32
  graphdef, params = nnx.split(model)
  half = nnx.merge(graphdef, training.cast_floats(params, jnp.bfloat16))
  x = jnp.asarray(tokens[None, :32])
  logits, reference = half(x), model(x)
  assert logits.dtype == jnp.float32  # the head accumulates in float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference),
                             atol=0.05 * float(jnp.abs(reference).max()))
  settings = dataclasses.replace(SETTINGS, steps=2, batch_size=2, mask_score="ria")
  result = training.train_three_stage_lora(model, tokens, CONFIG, settings, input_norms=norms,
                                           dtype=jnp.bfloat16, mesh=None, progress=False)
  assert result.dtype == "bfloat16" and np.all(np.isfinite(result.losses))
  first = training_batch(tokens, np.random.default_rng(settings.seed), settings.batch_size,
                         settings.sequence_length)
  dense_loss = float(jnp.mean(token_nll(model(jnp.asarray(first)), jnp.asarray(first))))
  assert result.losses[0] == pytest.approx(dense_loss, rel=2e-2)
  merged = _kernels(nnx.merge(graphdef, result.params))
  for path, kernel in merged.items():
    assert kernel.dtype == jnp.bfloat16
    assert is_vnm(np.asarray(result.masks[path]), CONFIG), path


def test_sensitivity_is_the_loss_increase_of_pruning_one_kernel(setup):
  model, _, batches, norms = setup
  tokens = batches[0][:, :24]
  found = allocation.kernel_sensitivities(model, tokens, ["8:2:8"], input_norms=norms,
                                          progress=False)
  assert sorted(found) == sorted(_kernels(model))
  path = "layers/1/mlp/down_proj/kernel"
  graphdef, params = nnx.split(model)
  masks = tree_masks(params, "8:2:8", filter=f"^{path}$", score="wanda",
                     input_norms={path: norms[path]})
  pruned = nnx.merge(graphdef, tree_apply_masks(params, masks))
  x = jnp.asarray(tokens)
  expected = float(jnp.mean(token_nll(pruned(x), x)) - jnp.mean(token_nll(model(x), x)))
  assert found[path]["8:2:8"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_study_runs_every_part_resumes_and_reports(setup, tmp_path):
  model, tokens, _, _ = setup
  split = TokenSplit(train=tokens[:-512], eval=tokens[-512:])
  settings = study.StudySettings(
      patterns=("8:2:5",), calibration_windows=2, permutation_seconds=0.05,
      candidates=("8:2:4", "8:2:8"), sensitivity_windows=1, sensitivity_length=32,
      allocation_densities=("8:2:5",), lora_patterns=(study.ALLOCATION,),
      lora=dataclasses.replace(SETTINGS, steps=3), eval_tokens=512)
  results = tmp_path / "results.jsonl"
  # Cached permutations are used as they are (the search itself is tested above).
  rng = np.random.default_rng(2)
  shapes = allocation.kernel_shapes(nnx.state(model))
  given = {p: Permutation(rng.permutation(k), None) for p, (k, _) in shapes.items()}
  (tmp_path / "work").mkdir()
  for name in ("8-2-4", "8-2-5", "8-2-8"):  # every config used: allocation + permutation runs
    study.save_permutations(given, tmp_path / "work" / f"permutations_{name}.npz")
  records = study.run_study(settings, model, split, work_dir=tmp_path / "work", results=results,
                            dtype=jnp.float32, progress=False, log=lambda _: None)
  methods = [r["method"] for r in records]
  assert methods == ["dense", "one-shot", "one-shot + permutation", "per-layer allocation",
                     "per-layer allocation + permutation", "per-layer allocation + LoRA"]
  uniform = average_density(shapes, "8:2:5")
  by_method = {r["method"]: r for r in records}
  assert by_method["one-shot"]["density"] == pytest.approx(uniform)
  assert by_method["per-layer allocation"]["density"] <= uniform + 1e-12
  assert all(np.isfinite(r["ppl"]) and r["eval_tokens"] == 512 for r in records)
  lora = by_method["per-layer allocation + LoRA"]
  assert lora["steps"] == 3 and lora["density"] == by_method["per-layer allocation"]["density"]
  # Rerunning skips what is recorded; the cached permutations are the searched ones.
  again = study.run_study(settings, model, split, work_dir=tmp_path / "work", results=results,
                          dtype=jnp.float32, progress=False, log=lambda _: None)
  assert len(again) == len(records)
  cached = study.load_permutations(tmp_path / "work" / "permutations_8-2-5.npz")
  assert sorted(cached) == sorted(given) and all(c.outputs is None for c in cached.values())
  np.testing.assert_array_equal(cached["layers/0/mlp/up_proj/kernel"].inputs,
                                given["layers/0/mlp/up_proj/kernel"].inputs)
  # A deadline cuts LoRA to the steps that fit: (100 - compile 10 - 2 x eval 2 - 5) / 0.5 s.
  planner = study._Study(settings, model, split, tmp_path / "work", results, jnp.float32,
                         deadline_s=100.0, progress=False, log=lambda _: None)
  planner.lora_timing, planner.evaluation_seconds = (10.0, 0.5), 2.0
  assert planner.lora_steps() == 3  # the preset's 3 fit
  planner.settings = dataclasses.replace(settings, lora=dataclasses.replace(SETTINGS, steps=999))
  assert 158 <= planner.lora_steps() <= 162
  study.save_split(split, tmp_path / "tokens.npz")  # what a GPU run reads instead of the text
  loaded = study.load_split(tmp_path / "tokens.npz")
  np.testing.assert_array_equal(loaded.train, split.train)
  np.testing.assert_array_equal(loaded.eval, split.eval)
  table = reports.study_table(again).splitlines()
  assert len(table) == 2 + len(records) and table[2].startswith("| dense | - | 1.0000 |")
  assert reports.plot_study(again, tmp_path / "plot.png").stat().st_size > 1000
