"""Per-layer V:N:M allocation, and mixed configs through masks, compression and matmul."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vnm_reference as ref
from vnm_jax import (VNMConfig, VNMLinear, allocate_configs, compress, convert_to_vnm, decompress,
                     is_vnm, tree_configs, tree_masks, vnm_matmul)
from vnm_jax.allocation import allocation_patterns, average_density, kept_entries

CANDIDATES = ("64:2:4", "64:2:5", "64:2:6", "64:2:8")


def test_kept_entries_counts_the_padded_last_group():
  for k, n, m in [(576, 64, 5), (37, 21, 6), (40, 8, 8), (3, 5, 4), (17, 3, 8)]:
    config = VNMConfig(8, 2, m)
    scores = np.random.default_rng(k).uniform(0.1, 1.0, (k, n))
    mask = ref.column_l1_mask(scores, config.v, m)
    assert kept_entries((k, n), config) == mask.sum(), (k, n, m)
  assert average_density({"a": (576, 10), "b": (1536, 10)}, "64:2:4") == 0.5


def test_sensitive_kernels_keep_more_under_the_density_budget():
  shapes = {f"k{i}": (64, 32) for i in range(4)}
  # k0 and k1 suffer badly from sparsity; k2 and k3 hardly at all.
  sensitivities = {p: {c: (10.0 if i < 2 else 0.1) * (1 - VNMConfig.parse(c).density)
                       for c in CANDIDATES} for i, p in enumerate(shapes)}
  allocation = allocate_configs(sensitivities, shapes, density="64:2:5")
  assert list(allocation) == list(shapes)
  assert all(isinstance(c, VNMConfig) for c in allocation.values())
  assert average_density(shapes, allocation) <= average_density(shapes, "64:2:5") + 1e-12
  assert allocation["k0"].m < allocation["k2"].m and allocation["k1"].m < allocation["k3"].m
  total = sum(sensitivities[p][str(c)] for p, c in allocation.items())
  assert total < sum(sensitivities[p]["64:2:5"] for p in shapes)


def test_greedy_is_optimal_for_a_cardinality_budget():
  """Equal shapes and two candidates: the budget allows upgrading exactly j kernels, and the
  best j upgrades (largest sensitivity drop) are the brute-force optimum."""
  rng = np.random.default_rng(0)
  shapes = {f"k{i}": (32, 16) for i in range(7)}
  sparse, dense = VNMConfig(8, 2, 8), VNMConfig(8, 2, 4)
  sensitivities = {p: {sparse: float(rng.uniform(1, 5)), dense: float(rng.uniform(0, 1))}
                   for p in shapes}
  for upgrades in range(8):
    density = (upgrades * 0.5 + (7 - upgrades) * 0.25) / 7
    allocation = allocate_configs(sensitivities, shapes, density=density)
    best = min(sum(sensitivities[p][dense if p in chosen else sparse] for p in shapes)
               for chosen in itertools.combinations(shapes, upgrades))
    assert sum(sensitivities[p][c] for p, c in allocation.items()) == pytest.approx(best)
    assert sum(c == dense for c in allocation.values()) == upgrades


def test_greedy_respects_a_cost_budget_and_skips_dominated_candidates():
  shapes = {"a": (64, 64), "b": (64, 64)}
  # 64:2:6 is dominated in a (costs more than 64:2:8, no better); costs are kernel times.
  sensitivities = {"a": {"64:2:8": 1.0, "64:2:6": 1.5, "64:2:4": 0.2},
                   "b": {"64:2:8": 0.6, "64:2:6": 0.3, "64:2:4": 0.25}}
  costs = {p: {"64:2:8": 1.0, "64:2:6": 1.4, "64:2:4": 2.0} for p in shapes}
  allocation = allocate_configs(sensitivities, shapes, costs=costs, budget=3.4)
  # a's upgrade to 2:4 gains 0.8 for 1.0 of cost; b's to 64:2:6 0.3 for 0.4: both fit.
  assert {p: str(c) for p, c in allocation.items()} == {"a": "64:2:4", "b": "64:2:6"}
  allocation = allocate_configs(sensitivities, shapes, costs=costs, budget=2.0)
  assert {p: str(c) for p, c in allocation.items()} == {"a": "64:2:8", "b": "64:2:8"}


def test_allocation_arguments_are_validated():
  shapes = {"a": (64, 64)}
  table = {"a": {"64:2:8": 1.0, "64:2:4": 0.0}}
  with pytest.raises(ValueError, match="either density= or both costs= and budget="):
    allocate_configs(table, shapes)
  with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
    allocate_configs(table, shapes, density=1.5)
  with pytest.raises(ValueError, match="exactly the paths of sensitivities; missing \\['a'\\]"):
    allocate_configs(table, {"b": (64, 64)}, density=0.3)
  with pytest.raises(ValueError, match=r"sensitivities\['a'\]\['64:2:8'\] must be a finite"):
    allocate_configs({"a": {"64:2:8": float("nan")}}, shapes, density=0.3)
  with pytest.raises(ValueError, match="VNMConfig.n must be 2"):
    allocate_configs({"a": {"64:3:8": 1.0}}, shapes, density=0.3)
  with pytest.raises(ValueError, match=r"shapes\['a'\] must be a 2D kernel shape"):
    allocate_configs(table, {"a": (64,)}, density=0.3)
  with pytest.raises(ValueError, match="below the cost of the cheapest candidate"):
    allocate_configs(table, shapes, density=0.1)


def test_mixed_configs_mask_compress_and_multiply_like_dense_math():
  model = nnx.Sequential(nnx.Linear(40, 48, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(48, 24, rngs=nnx.Rngs(1)), nnx.relu,
                         nnx.Linear(24, 16, rngs=nnx.Rngs(2)))
  params = nnx.state(model, nnx.Param)
  allocation = {"layers/0/kernel": VNMConfig(8, 2, 5), "layers/2/kernel": VNMConfig(8, 2, 8),
                "layers/4/kernel": VNMConfig(8, 2, 4)}
  patterns = allocation_patterns(allocation)
  configs = tree_configs(params, None, configs=patterns)
  masks = tree_masks(params, None, configs=patterns)
  x = jax.random.normal(jax.random.key(0), (6, 40))
  h = x
  for index in (0, 2, 4):
    path = f"layers/{index}/kernel"
    config = allocation[path]
    assert configs["layers"][index]["kernel"] == config
    mask = np.asarray(masks["layers"][index]["kernel"])
    kernel = np.asarray(model.layers[index].kernel[...])
    np.testing.assert_array_equal(mask, ref.column_l1_mask(np.abs(kernel), config.v, config.m))
    weight = compress(kernel, config, mask=mask)
    assert weight.config == config and is_vnm(mask, config)
    np.testing.assert_array_equal(np.asarray(decompress(weight)), kernel * mask)
    dense = np.asarray(h, np.float64) @ (kernel * mask).astype(np.float64)
    y = np.asarray(vnm_matmul(h, weight), np.float64)
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    h = jax.nn.relu(jnp.asarray(dense, jnp.float32) + model.layers[index].bias[...])
  # The whole model: convert_to_vnm with the {regex: config} patterns vs the masked model.
  masked = nnx.clone(model)
  for index in (0, 2, 4):
    masked.layers[index].kernel[...] = model.layers[index].kernel[...] * masks["layers"][index][
        "kernel"]
  compressed = convert_to_vnm(nnx.clone(model), masks, patterns)
  for index in (0, 2, 4):
    layer = compressed.layers[index]
    assert isinstance(layer, VNMLinear) and layer.config == allocation[f"layers/{index}/kernel"]
  reference, out = np.asarray(masked(x)), np.asarray(compressed(x))
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
