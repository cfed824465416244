"""Tests of the ViT recipe's fair comparison: the same-budget dense baseline, the seeds'
summary (mean, sample std, paired differences), and saving/resuming seeds."""

import dataclasses
import json
import statistics

import jax
import numpy as np
import pytest

import vnm_jax
from vnm_recipes.data import digits
from vnm_recipes.models import vit
from vnm_recipes.vit import pipeline as vit_pipeline
from vnm_recipes.vit import presets as vit_presets
from vnm_recipes.vit import reports as vit_reports
from vnm_recipes.vit import training as vit_training

TINY = vit.ViTConfig(dim=16, depth=1, num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module")
def small_split():
  split = digits.load_digits_split()
  return split._replace(train_images=split.train_images[:64], train_labels=split.train_labels[:64])


# ----------------------------------------------------------------------------- same budget

def _fine_tune_with_all_ones_mask(graphdef, params, data, config):
  """The pipeline's fixed-mask fine-tuning (optimizer, step, epochs) with nothing pruned."""
  names = vit_pipeline._kernel_names(TINY)
  masks = vnm_jax.tree_masks(params, "16:2:5", filter=lambda path, leaf: path in names)
  ones = jax.tree.map(lambda m: None if m is None else np.ones(m.shape, bool), masks,
                      is_leaf=lambda m: m is None)
  steps = (len(data.train_images) // config.batch_size) * config.epochs
  tx = vnm_jax.fixed_mask(vit_training.make_optimizer(config, steps), ones)
  step = vit_training.sparse_step(graphdef, tx, config)
  indices = vit_pipeline.permutation_indices(params, names, {})
  (tuned, _, _), losses, taken = vit_training.run_epochs(
      step, (params, tx.init(params), indices), data, config, "ones", False)
  return tuned, losses, taken


SAME_BUDGET = vit_training.TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, seed=3)


@pytest.fixture(scope="module")
def same_budget(small_split):
  """(start params, graphdef, the same-budget run of SAME_BUDGET from them)."""
  graphdef, params = vit_training.init_model(TINY, seed=0)
  run = vit_training.train_same_budget(graphdef, params, small_split, SAME_BUDGET, progress=False)
  return params, graphdef, run


def test_same_budget_dense_is_the_fine_tuning_without_its_mask(small_split, same_budget):
  # With an all-ones mask, the sparse fine-tuning must become exactly the same-budget
  # dense training: same optimizer and schedule, same batches, keys and number of steps.
  params, graphdef, same = same_budget
  tuned, losses, taken = _fine_tune_with_all_ones_mask(graphdef, params, small_split, SAME_BUDGET)
  assert same.steps == taken == 2 * (64 // 16)
  np.testing.assert_allclose(same.epoch_losses, losses, rtol=1e-5)
  same_leaves = dict(jax.tree_util.tree_flatten_with_path(same.params)[0])
  tuned_leaves = dict(jax.tree_util.tree_flatten_with_path(tuned)[0])
  start_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, a in same_leaves.items():
    a, b, start = (np.asarray(x) for x in (a, tuned_leaves[path], start_leaves[path]))
    if vnm_jax.path_str(path) == "blocks/0/attention/qkv/bias":
      # The key bias's gradient is exactly zero (softmax ignores a constant added to a
      # query's logits): Adam turns its rounding noise into lr-sized steps. Skip it.
      a, b, start = (np.delete(x, np.s_[TINY.dim:2 * TINY.dim]) for x in (a, b, start))
    # 8 Adam steps at lr 1e-3 move every entry by ~3e-3; the two runs agree to ~1e-7 here
    # (the bound, scaled to the leaf, leaves room for another CPU's summation order).
    assert np.abs(a - start).max() > 1e-3, path
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * np.abs(b).max(),
                               err_msg=vnm_jax.path_str(path))


def test_same_budget_is_deterministic_per_seed(small_split, same_budget):
  params, graphdef, same = same_budget
  again = vit_training.train_same_budget(graphdef, params, small_split, SAME_BUDGET,
                                         progress=False)
  for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_epochs_draw_the_same_batches_and_keys_for_a_seed(small_split):
  """run_epochs (shared by the dense, same-budget and sparse trainings) is a function of the
  seed alone: a step that records what it is given sees the same stream for a seed."""
  def stream(seed):
    record = lambda seen, images, labels, key: (
        seen + [(labels.tolist(), jax.random.key_data(key).tolist())], 0.0)
    config = dataclasses.replace(SAME_BUDGET, seed=seed)
    seen, _, steps = vit_training.run_epochs(record, [], small_split, config, "", False)
    assert steps == len(seen) == 2 * (64 // 16)
    return seen

  assert stream(3) == stream(3)
  other = stream(4)
  assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(stream(3), other))


# ----------------------------------------------------------------------------- summary over seeds

# Per seed: (dense, same budget, {(config, permuted, method): accuracy}).
_SEEDS = {
    0: (0.880, 0.890, {("64:2:5", False, "fixed-mask"): 0.886, ("64:2:5", True, "fixed-mask"): 0.889,
                       ("64:2:8", False, "fixed-mask"): 0.860, ("64:2:8", True, "fixed-mask"): 0.872}),
    1: (0.884, 0.887, {("64:2:5", False, "fixed-mask"): 0.880, ("64:2:5", True, "fixed-mask"): 0.885,
                       ("64:2:8", False, "fixed-mask"): 0.866, ("64:2:8", True, "fixed-mask"): 0.871}),
    2: (0.878, 0.893, {("64:2:5", False, "fixed-mask"): 0.889, ("64:2:5", True, "fixed-mask"): 0.890,
                       ("64:2:8", False, "fixed-mask"): 0.870, ("64:2:8", True, "fixed-mask"): 0.880}),
}


def _seed_result(seed):
  dense, same, accuracies = _SEEDS[seed]
  variants = [vit_reports.VariantResult(c, p, m, a, speedup=1.0 + 0.1 * seed, seconds=1.0, steps=40)
              for (c, p, m), a in accuracies.items()]
  return vit_reports.SeedResult(seed, dense, same, 10.0, 2.0, 40, variants, {"x": []})


def _result(tmp_path, seeds=(0, 1, 2)):
  return vit_reports.PipelineResult(
      preset="test", dataset="fashion_mnist", device="cpu", finetune_epochs=5, dense_epochs=30,
      seeds=[_seed_result(s) for s in seeds], graphdef=None, table_path=tmp_path / "r.md",
      json_path=tmp_path / "r.json", plot_path=tmp_path / "r.png")


def _mean_std_text(values, sign=False):
  values = [100 * v for v in values]
  mean, std = np.mean(values), np.std(values, ddof=1)
  return (f"{mean:+.2f}" if sign else f"{mean:.2f}") + f" ± {std:.2f}"


def test_summary_rows_are_paired_means_and_sample_stds(tmp_path):
  result = _result(tmp_path)
  table = result.to_markdown()
  same = [_SEEDS[s][1] for s in range(3)]
  dense = [_SEEDS[s][0] for s in range(3)]
  assert (f"| dense | - | original (30 epochs) | {_mean_std_text(dense)} | "
          f"{_mean_std_text(np.subtract(dense, same), sign=True)} | 1.00x |") in table
  assert f"| dense | - | same budget (+5 epochs) | {_mean_std_text(same)} | baseline |" in table
  for key in _SEEDS[0][2]:
    accuracies = [_SEEDS[s][2][key] for s in range(3)]
    config, permuted, method = key
    row = (f"| {config} | {'yes' if permuted else 'no'} | {method} | "
           f"{_mean_std_text(accuracies)} | "
           f"{_mean_std_text(np.subtract(accuracies, same), sign=True)} | 1.10x | "
           + " / ".join(f"{100 * a:.2f}" for a in accuracies) + " |")
    assert row in table, row
  for config in ("64:2:5", "64:2:8"):
    effect = [_SEEDS[s][2][(config, True, "fixed-mask")] - _SEEDS[s][2][(config, False, "fixed-mask")]
              for s in range(3)]
    assert f"| {config} | fixed-mask | {_mean_std_text(effect, sign=True)} |" in table


def test_targets_use_the_best_mean_against_the_same_budget_dense(tmp_path):
  lines = _result(tmp_path).target_lines()
  # 64:2:5 permuted: mean paired difference (-0.1 - 0.2 - 0.3) / 3 = -0.2 points: met.
  # 64:2:8 permuted: (-1.8 - 1.6 - 1.3) / 3 = -1.57 points: over 1.5, not met.
  assert lines[0].startswith("- 64:2:5: best fine-tuned") and "permutation yes" in lines[0]
  assert "-0.20 ± 0.10 points" in lines[0] and lines[0].endswith(": met.")
  assert "-1.57 ± 0.25 points" in lines[1] and lines[1].endswith("NOT met.")


def test_one_seed_has_no_spread_and_the_files_are_written(tmp_path):
  result = _result(tmp_path, seeds=(1,))
  vit_reports.write_results(result)
  table = result.table_path.read_text()
  assert "±" not in table and "one run, seed(s) 1" in table
  saved = json.loads(result.json_path.read_text())
  assert vit_reports.SeedResult.from_dict(saved["seeds"][0]).as_dict() == _seed_result(1).as_dict()
  assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="at least one value"):
    vit_reports.mean_std([])


def test_mean_std_is_the_sample_deviation():
  values = [0.3, 0.5, 1.3]
  assert vit_reports.mean_std(values) == pytest.approx(
      (statistics.fmean(values), float(np.std(values, ddof=1))))


# ----------------------------------------------------------------------------- seeds: save, resume

TINY_PRESET = vit_presets.PipelinePreset(
    name="tiny", model=TINY, dense=vit_training.TrainConfig(epochs=1),
    finetune=vit_training.TrainConfig(epochs=1), configs=("16:2:5",), seeds=(0, 1))


@pytest.fixture
def fake_runs(monkeypatch):
  """Replaces the training of a seed by a record of which seeds were run."""
  runs = []

  def fake_run_seed(preset, data, seed, progress, log):
    runs.append((seed, preset.dense.epochs))
    return _seed_result(seed), None

  monkeypatch.setattr(vit_pipeline, "run_seed", fake_run_seed)
  monkeypatch.setattr(vit_pipeline, "_load_data", lambda preset, data_dir: None)
  return runs


def test_seeds_are_saved_and_resumed(tmp_path, fake_runs):
  lines = []
  first = vit_pipeline.run_pipeline(TINY_PRESET, tmp_path, seeds=[0], log=lines.append)
  assert fake_runs == [(0, 1)] and [s.seed for s in first.seeds] == [0]
  assert vit_pipeline.seed_path(tmp_path, 0).exists()
  both = vit_pipeline.run_pipeline(TINY_PRESET, tmp_path, resume=True, log=lines.append)
  assert fake_runs == [(0, 1), (1, 1)] and [s.seed for s in both.seeds] == [0, 1]
  assert any("seed 0: loaded from" in line for line in lines)
  assert [s.as_dict() for s in both.seeds] == [_seed_result(0).as_dict(), _seed_result(1).as_dict()]
  # Without resume the seeds asked for run again; the table still covers every saved seed.
  again = vit_pipeline.run_pipeline(TINY_PRESET, tmp_path, seeds=[1], log=lines.append)
  assert fake_runs[2:] == [(1, 1)] and [s.seed for s in again.seeds] == [0, 1]


def test_saved_seeds_of_other_settings_are_not_reused(tmp_path, fake_runs):
  vit_pipeline.run_pipeline(TINY_PRESET, tmp_path, seeds=[0], log=lambda line: None)
  longer = dataclasses.replace(TINY_PRESET, dense=vit_training.TrainConfig(epochs=2))
  result = vit_pipeline.run_pipeline(longer, tmp_path, seeds=[0], resume=True,
                                     log=lambda line: None)
  assert fake_runs == [(0, 1), (0, 2)] and len(result.seeds) == 1
  renamed = dataclasses.replace(longer, name="other", seeds=(0, 5))
  assert renamed.settings() == longer.settings()  # name and seeds do not change results


@pytest.mark.parametrize("seeds", [[], [-1], [True], [0.5]])
def test_run_pipeline_rejects_bad_seeds(tmp_path, seeds):
  with pytest.raises(ValueError, match="seeds"):
    vit_pipeline.run_pipeline(TINY_PRESET, tmp_path, seeds=seeds)


@pytest.mark.parametrize("changes, match", [
    (dict(seeds=()), "seeds"), (dict(seeds=(0, 0)), "seeds"), (dict(seeds=(-1,)), "seeds"),
    (dict(dataset="cifar10"), "dataset"), (dict(configs=()), "configs")])
def test_preset_rejects_bad_values(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY_PRESET, **changes)


def test_model_must_match_the_data_set():
  preset = dataclasses.replace(TINY_PRESET, model=vit_presets.FASHION_MNIST_VIT)
  with pytest.raises(ValueError, match=r"model takes \(28, 28, 1\) images, but 'digits'"):
    vit_pipeline._load_data(preset, None)


def test_full_preset_is_fashion_mnist_on_three_seeds():
  full = vit_presets.PRESETS["full"]
  assert full.dataset == "fashion_mnist" and full.seeds == (0, 1, 2)
  assert (full.model.image_size, full.model.channels) == (28, 1)
  assert {"64:2:5", "64:2:8"} <= set(full.configs)
