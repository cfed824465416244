import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vnm_jax
from vnm_jax.config import VNMConfig
from vnm_jax.masks import vnm_mask
from vnm_jax.permutation import Permutation
from vnm_jax.scores import Importance, ria_score, wanda_score
from vnm_jax.trees import (default_filter, path_str, sparsity_summary, tree_apply_masks,
                           tree_configs, tree_masks)

# The test models' DenseGeneral query kernel (16, 2, 8) stays dense under the default
# filter, which warns about it: asserted in test_default_filter_warns_about_nd_kernels.
pytestmark = pytest.mark.filterwarnings("ignore:'[^']*query/kernel' has shape:UserWarning")

CONFIG = VNMConfig.parse("4:2:8")
MLP_KERNELS = ["layers_0/mlp/fc1/kernel", "layers_0/mlp/fc2/kernel",
               "layers_1/mlp/fc1/kernel", "layers_1/mlp/fc2/kernel"]


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    q = nn.DenseGeneral((2, 8), name="query")(h)  # 3D kernel (16, 2, 8): skipped by default
    x = x + q.reshape(*q.shape[:-2], 16)
    h = nn.relu(nn.Dense(32, name="fc1")(x))
    return x + nn.Dense(16, name="fc2")(h)


class LinenLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 16, name="embed")(tokens)
    for i in range(2):
      x = LinenBlock(name=f"layers_{i}")(x)  # params under layers_i/...
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(50, name="lm_head")(x)


@functools.cache
def _linen_variables():
  return LinenLM().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def linen_params():
  variables = _linen_variables()
  # Move each block's fc1/fc2 under an "mlp" level to get paths like layers_0/mlp/fc1/kernel.
  params = jax.tree.map(lambda x: x, variables["params"])
  for i in range(2):
    block = params[f"layers_{i}"]
    block["mlp"] = {"fc1": block.pop("fc1"), "fc2": block.pop("fc2")}
  return {"params": params}


class NnxMLPBlock(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 16, rngs=rngs)


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.query = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
    self.mlp = NnxMLPBlock(rngs)


class NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 16, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(2)])
    self.final_norm = nnx.LayerNorm(16, rngs=rngs)
    self.lm_head = nnx.Linear(16, 50, rngs=rngs)


NNX_MLP_KERNELS = [k.replace("layers_", "layers/") for k in MLP_KERNELS]


@functools.cache
def _nnx_model():
  return NnxLM(nnx.Rngs(0))


def nnx_state():
  return nnx.state(_nnx_model(), nnx.Param)


def flat(tree, is_leaf=None):
  """{path string: leaf} by an independent walk (keys joined with '/')."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in key_path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    out["/".join(map(str, keys))] = leaf
  return out


def configured(tree):
  return {p: c for p, c in flat(tree, is_leaf=lambda x: isinstance(x, VNMConfig)).items()
          if c is not None}


# (params, kernel paths the default filter must select, prefix of every path)
LAYOUTS = {
    "linen_variables": (linen_params, MLP_KERNELS, "params/"),
    "linen_params": (lambda: linen_params()["params"], MLP_KERNELS, ""),
    "nnx_state": (nnx_state, NNX_MLP_KERNELS, ""),
    "nnx_pure_state": (lambda: nnx.as_pure(nnx_state()), NNX_MLP_KERNELS, ""),
}


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
  make, kernels, prefix = LAYOUTS[request.param]
  return make(), [prefix + k for k in kernels], prefix


def test_path_str_handles_key_kinds():
  keys = jax.tree_util
  path = (keys.DictKey("a"), keys.SequenceKey(3), keys.GetAttrKey("b"),
          keys.FlattenedIndexKey(2), keys.GetAttrKey("value"))
  assert path_str(path) == "a/3/b/2"


def test_default_filter_selects_mlp_kernels(layout):
  params, kernels, _ = layout
  configs = tree_configs(params, "4:2:8")
  assert jax.tree.structure(configs, is_leaf=lambda x: x is None) == \
      jax.tree.structure(jax.tree.map(lambda _: None, params), is_leaf=lambda x: x is None)
  assert configured(configs) == {k: CONFIG for k in kernels}


def test_default_filter_rule():
  leaf2d, leaf3d = jnp.zeros((4, 4)), jnp.zeros((4, 2, 2))
  assert default_filter("block/fc/kernel", leaf2d)
  with pytest.warns(UserWarning, match="'block/fc/kernel' has shape"):
    assert not default_filter("block/fc/kernel", leaf3d)
  assert not default_filter("block/fc/bias", leaf2d)
  for dense in ["embed/kernel", "tok_embedding/kernel", "ln_norm/kernel", "lm_head/kernel",
                "head/kernel", "cls_head_0/kernel", "classifier/kernel", "Head/kernel"]:
    assert not default_filter(dense, leaf2d), dense
  assert default_filter("attention_heads/out/kernel", leaf2d)


def test_regex_and_predicate_filters(layout):
  params, kernels, prefix = layout
  fc1 = [k for k in kernels if "fc1" in k]
  assert set(configured(tree_configs(params, CONFIG, filter=r"mlp/fc1/kernel$"))) == set(fc1)
  selected = configured(tree_configs(
      params, CONFIG, filter=lambda path, leaf: path.endswith("kernel") and leaf.shape[0] == 32))
  assert set(selected) == {k for k in kernels if "fc2" in k}
  # A user filter replaces the default one: the head can be selected.
  head = configured(tree_configs(params, "2:4", filter="lm_head/kernel"))
  assert head == {prefix + "lm_head/kernel": VNMConfig.parse("2:4")}


def test_per_path_configs(layout):
  params, kernels, _ = layout
  configs = tree_configs(params, "4:2:8", configs={r"layers.0/mlp/fc1": "2:2:5",
                                                   r"layers.1/mlp/fc2": None,
                                                   r"fc1": VNMConfig(8, 2, 4)})
  expected = {kernels[0]: VNMConfig(2, 2, 5), kernels[1]: CONFIG,
              kernels[2]: VNMConfig(8, 2, 4)}
  assert configured(configs) == expected
  # config=None: only the leaves ``configs`` names are pruned.
  only = configured(tree_configs(params, None, configs={"fc2": "2:4"}))
  assert only == {kernels[1]: VNMConfig.parse("2:4"), kernels[3]: VNMConfig.parse("2:4")}


def test_tree_configs_reads_only_shapes():
  params = linen_params()
  shapes = jax.eval_shape(lambda p: p, params)
  assert configured(tree_configs(shapes, CONFIG)) == configured(tree_configs(params, CONFIG))

  @jax.jit
  def count_selected(p):
    return sum(c is not None for c in jax.tree.leaves(
        tree_configs(p, CONFIG), is_leaf=lambda x: isinstance(x, VNMConfig)))

  assert int(count_selected(params)) == 4


def kernels_of(params):
  return {p: np.asarray(leaf) for p, leaf in flat(params).items() if p.endswith("kernel")}


def masks_of(masks):
  return {p: np.asarray(m) for p, m in flat(masks).items()}


def test_magnitude_masks_equal_vnm_mask_leaf_by_leaf(layout):
  params, kernels, prefix = layout
  masks = tree_masks(params, "4:2:8", configs={"layers.1/mlp/fc2": "2:2:5"})
  found = masks_of(masks)
  assert set(found) == set(kernels)
  values = kernels_of(params)
  for path in kernels:
    config = "2:2:5" if "1/mlp/fc2" in path else "4:2:8"
    np.testing.assert_array_equal(found[path], vnm_mask(values[path], config), err_msg=path)
    assert found[path].dtype == np.bool_


def norms_for(kernels, params, prefix):
  """Per-input norms keyed without the linen 'params/' level, as calibration returns them."""
  values = kernels_of(params)
  rng = np.random.default_rng(5)
  return {k[len(prefix):]: np.abs(rng.standard_normal(values[k].shape[0])).astype(np.float32)
          for k in kernels}


@pytest.mark.parametrize("score", ["wanda", Importance.RIA,
                                   functools.partial(ria_score, a=1.0)])
def test_activation_aware_masks_equal_vnm_mask(layout, score):
  params, kernels, prefix = layout
  norms = norms_for(kernels, params, prefix)
  masks = masks_of(tree_masks(params, CONFIG, score=score, input_norms=norms,
                              rule="exhaustive"))
  values = kernels_of(params)
  for path in kernels:
    norm = norms[path[len(prefix):]]
    if score == "wanda":
      expected_scores = wanda_score(values[path], norm)
    elif score is Importance.RIA:
      expected_scores = ria_score(values[path], norm, a=0.5)
    else:
      expected_scores = ria_score(values[path], norm, a=1.0)
    np.testing.assert_array_equal(
        masks[path], vnm_mask(values[path], CONFIG, scores=expected_scores, rule="exhaustive"))


def test_tree_masks_under_jit_equals_eager():
  params = nnx_state()
  norms = {k: np.linspace(0.5, 1.5, 16 if "fc1" in k else 32).astype(np.float32)
           for k in NNX_MLP_KERNELS}
  make = functools.partial(tree_masks, config=CONFIG, score="ria", input_norms=norms)
  jax.tree.map(np.testing.assert_array_equal, masks_of(jax.jit(make)(params)),
               masks_of(make(params)))


def test_given_scores_and_permutations_by_path():
  params = linen_params()
  values = kernels_of(params)
  path = "params/layers_0/mlp/fc1/kernel"
  scores = {path: np.asarray(values[path][::-1] ** 2)}  # any non-negative scores
  rng = np.random.default_rng(1)
  permutation = Permutation(rng.permutation(16), rng.permutation(32))
  masks = masks_of(tree_masks(params, CONFIG, scores=scores,
                              permutations={"layers_0/mlp/fc1/kernel": permutation}))
  np.testing.assert_array_equal(
      masks[path], vnm_mask(values[path], CONFIG, scores=scores[path], permutation=permutation))
  other = "params/layers_1/mlp/fc1/kernel"
  np.testing.assert_array_equal(masks[other], vnm_mask(values[other], CONFIG))


def test_default_filter_warns_about_nd_kernels(layout):
  # The one rule for nD kernels: the default filter keeps them dense and names each one
  # with the fix; a filter that selects one without in_axes is an error (no guessing).
  params, kernels, _ = layout
  with pytest.warns(UserWarning) as caught:
    configs = configured(tree_configs(params, CONFIG))
  messages = {str(w.message) for w in caught}
  query = [p for p in vnm_jax.leaves_by_path(params) if p.endswith("query/kernel")]
  assert len(query) == 2 and set(configs) == set(kernels)
  for path in query:
    shown = next(m for m in messages if f"/{path}'" in m or f"'{path}'" in m)
    assert "(16, 2, 8) and stays dense" in shown and "in_axes={" in shown and "filter=" in shown
  with pytest.raises(ValueError, match="needs its contraction axes in in_axes"):
    tree_masks(params, CONFIG, filter="query/kernel")


def test_nd_kernel_with_in_axes(layout):
  params, _, prefix = layout
  masks = masks_of(tree_masks(params, "2:2:4", filter=r"query/kernel",
                              in_axes={"query": (0,)}))
  values = kernels_of(params)
  query_paths = [p for p in values if p.endswith("query/kernel")]
  assert len(query_paths) == 2 and set(masks) == set(query_paths)
  for path in query_paths:
    assert values[path].shape == (16, 2, 8)
    np.testing.assert_array_equal(masks[path], vnm_mask(values[path], "2:2:4", in_axes=(0,)))


def test_nd_kernel_scores_use_flattened_input_norms():
  params = linen_params()["params"]
  kernel = np.asarray(params["layers_0"]["query"]["kernel"])  # (16, 2, 8): in_axes (0,)
  norms = {"layers_0/query/kernel": np.linspace(0.1, 2.0, 16).astype(np.float32)}
  masks = tree_masks(params, "2:2:4", filter=r"layers_0/query/kernel", score="wanda",
                     input_norms=norms, in_axes={"query": 0})
  expected_scores = np.abs(kernel) * norms["layers_0/query/kernel"][:, None, None]
  np.testing.assert_array_equal(masks["layers_0"]["query"]["kernel"],
                                vnm_mask(kernel, "2:2:4", scores=expected_scores, in_axes=0))


def test_apply_masks_keeps_structure_and_zeroes(layout):
  params, kernels, _ = layout
  masks = tree_masks(params, CONFIG)
  pruned = tree_apply_masks(params, masks)
  assert jax.tree.structure(pruned) == jax.tree.structure(params)
  before, after, found = kernels_of(params), kernels_of(pruned), masks_of(masks)
  for path, value in flat(params).items():
    expected = np.where(found[path], value, 0) if path in found else np.asarray(value)
    np.testing.assert_array_equal(flat(pruned)[path], expected, err_msg=path)
  assert all(after[k].dtype == before[k].dtype for k in before)


def test_apply_masks_across_variable_and_pure_states():
  state = nnx_state()
  masks = tree_masks(state, CONFIG)  # Param-wrapped masks
  pruned = tree_apply_masks(nnx.as_pure(state), masks)
  np.testing.assert_array_equal(
      pruned["layers"][0]["mlp"]["fc1"]["kernel"],
      np.where(masks["layers"][0]["mlp"]["fc1"]["kernel"][...],
               state["layers"][0]["mlp"]["fc1"]["kernel"][...], 0))
  # The documented jax.tree.map recipe gives the same tree.
  by_hand = jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, 0), masks, state,
                         is_leaf=lambda x: x is None)
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(by_hand), pruned)


def test_sparsity_summary_matches_numpy_counts(layout):
  params, kernels, _ = layout
  configs = tree_configs(params, CONFIG, configs={"layers.0/mlp/fc1": "2:2:5"})
  masks = tree_masks(params, CONFIG, configs={"layers.0/mlp/fc1": "2:2:5"})
  summary = sparsity_summary(params, masks, configs)
  found = masks_of(masks)
  assert [row.path for row in summary.layers] == kernels
  for row in summary.layers:
    assert row.kept == int(np.sum(found[row.path])) and row.size == found[row.path].size
    assert row.density == pytest.approx(np.mean(found[row.path]))
    assert row.config == (VNMConfig(2, 2, 5) if "0/mlp/fc1" in row.path else CONFIG)
  kept = sum(int(np.sum(m)) for m in found.values())
  masked_size = sum(m.size for m in found.values())
  all_size = sum(np.size(x) for x in jax.tree.leaves(params))
  assert summary.masked_density == pytest.approx(kept / masked_size)
  assert summary.total_density == pytest.approx((kept + all_size - masked_size) / all_size)
  assert summary.total_size == all_size
  table = str(summary)
  assert table == summary.to_markdown()
  lines = table.splitlines()
  assert lines[0].startswith("| path") and set(lines[1]) <= {"|", "-"}
  assert len(lines) == 2 + len(kernels) + 2
  assert f"{summary.total_density:.4f}" in lines[-1] and "2:2:5" in table


def test_summary_without_configs_and_with_no_masks():
  params = linen_params()
  summary = sparsity_summary(params, jax.tree.map(lambda _: None, params))
  assert summary.layers == () and summary.total_density == 1.0
  masks = tree_masks(params, "2:4")
  assert sparsity_summary(params, masks).masked_density == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(filter="("), ValueError, r"filter has an invalid regular expression '\('"),
    (dict(filter=3), TypeError, "filter must be None, a regex string or a predicate"),
    (dict(filter="nothing_matches"), ValueError, "selected no leaf of params"),
    (dict(filter="fc1"), ValueError, r"filter selected '.*fc1/bias' with shape \(32,\)"),
    (dict(configs={"[": "2:4"}), ValueError, "configs has an invalid regular expression"),
    (dict(configs={"fc1": "2-4"}), ValueError, r"configs\['fc1'\]: config must look like"),
    (dict(configs={"fc1": "4:2:3"}), ValueError, r"configs\['fc1'\]: VNMConfig.m must be >= 4"),
    (dict(configs={"lm_head": "2:4"}), ValueError, r"configs patterns \['lm_head'\] match no "
     r"leaf selected by the filter"),
    (dict(configs=["fc1"]), TypeError, "configs must be a mapping"),
])
def test_tree_configs_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    tree_configs(linen_params(), "4:2:8", **kwargs)


@pytest.mark.parametrize("config, error, match", [
    ("64:2:2", ValueError, r"config: VNMConfig.m must be >= 4"),
    ("abc", ValueError, r"config: config must look like 'V:N:M'"),
    (8, TypeError, r"config: config must be a VNMConfig or a string"),
])
def test_bad_config(config, error, match):
  with pytest.raises(error, match=match):
    tree_configs(linen_params(), config)


def test_tree_masks_errors():
  params = linen_params()
  path = "params/layers_0/mlp/fc1/kernel"
  with pytest.raises(ValueError, match=r"score must be one of \['magnitude', 'wanda', 'ria'\]"):
    tree_masks(params, CONFIG, score="sparsegpt")
  with pytest.raises(ValueError, match="rule must be one of"):
    tree_masks(params, CONFIG, rule="best")
  with pytest.raises(ValueError, match=r"score='wanda' needs input_norms for "
                     r"'params/layers_0/mlp/fc1/kernel' \(shape \(16,\)\); no input_norms"):
    tree_masks(params, CONFIG, score="wanda")
  with pytest.raises(ValueError, match="input_norms has entries for paths that are not in "
                                       "params: 'x/kernel'"):
    tree_masks(params, CONFIG, score="ria", input_norms={"x/kernel": np.ones(16)})
  some = {"layers_0/mlp/fc2/kernel": np.ones(32)}  # norms for another kernel only
  with pytest.raises(ValueError, match="input_norms has entries for 'layers_0/mlp/fc2/kernel'"):
    tree_masks(params, CONFIG, score="ria", input_norms=some)
  with pytest.raises(ValueError, match=r"while masking 'params/layers_0/mlp/fc1/kernel': "
                     r"input_norms must have shape \(in_features,\) = \(16,\)"):
    tree_masks(params, CONFIG, score="wanda",
               input_norms={"layers_0/mlp/fc1/kernel": np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=r"scores\['params/layers_0/mlp/fc1/kernel'\] has shape "
                     r"\(32, 16\); it must have the kernel's shape \(16, 32\)"):
    tree_masks(params, CONFIG, scores={path: np.ones((32, 16), np.float32)})
  nan_scores = np.ones((16, 32), np.float32)
  nan_scores[3, 4] = np.nan
  with pytest.raises(ValueError, match=r"while masking '.*fc1/kernel': scores contains 1 NaN"):
    tree_masks(params, CONFIG, scores={path: nan_scores})
  with pytest.raises(ValueError, match=r"while masking '.*fc1/kernel': scores contains negative"):
    tree_masks(params, CONFIG, scores={path: -np.ones((16, 32), np.float32)})
  with pytest.raises(ValueError, match=r"score function returned shape \(32, 16\)"):
    tree_masks(params, CONFIG, score=lambda kernel, norms: jnp.abs(kernel).T)
  with pytest.raises(ValueError, match=r"has shape \(16, 2, 8\): a kernel with more than 2 dims "
                     r"needs its contraction axes in in_axes"):
    tree_masks(params, CONFIG, filter="query/kernel")
  with pytest.raises(ValueError, match="in_axes has an invalid regular expression"):
    tree_masks(params, CONFIG, filter="query/kernel", in_axes={"(": 0})


def test_apply_and_summary_errors():
  params = linen_params()
  masks = tree_masks(params, CONFIG)
  with pytest.raises(ValueError, match=r"masks has entries for paths that are not in params: "
                     r"'other/kernel'"):
    tree_apply_masks(params, {"other/kernel": np.ones((2, 2), bool)})
  wrong = {"layers_0/mlp/fc1/kernel": np.ones((16, 16), bool)}
  with pytest.raises(ValueError, match=r"masks\['params/layers_0/mlp/fc1/kernel'\] has shape "
                     r"\(16, 16\); the parameter has shape \(16, 32\)"):
    tree_apply_masks(params, wrong)
  with pytest.raises(ValueError, match=r"has shape \(16, 16\); the parameter has shape"):
    sparsity_summary(params, wrong)
  assert sparsity_summary(params["params"], masks).masked_density == pytest.approx(0.25)


def test_kernel_scores_by_path_match_importance_scores():
  rng = np.random.default_rng(7)
  params = {"enc": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)},
            "dec": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}}
  norms = {"enc/kernel": jnp.arange(1.0, 9.0)}
  scores = vnm_jax.kernel_scores(params, "wanda", filter="enc", input_norms=norms)
  assert set(scores) == {"enc/kernel"}
  np.testing.assert_allclose(
      np.asarray(scores["enc/kernel"]),
      np.abs(np.asarray(params["enc"]["kernel"])) * np.arange(1.0, 9.0)[:, None], rtol=1e-6)


def test_leaves_by_path_strips_the_linen_collection_and_skips_dense_leaves():
  params = linen_params()
  masks = tree_masks(params, CONFIG)
  found = vnm_jax.leaves_by_path(masks)
  assert sorted(found) == sorted(MLP_KERNELS)
  assert set(vnm_jax.leaves_by_path(params)) >= set(MLP_KERNELS)
  assert vnm_jax.leaves_by_path(None) == {}
  assert vnm_jax.leaves_by_path({"params/a/kernel": 1, "b": 2}) == {"a/kernel": 1, "b": 2}


def test_tree_permute_reorders_named_kernels_and_tree_unpermute_undoes_it():
  params = linen_params()
  rng = np.random.default_rng(3)
  fc1 = np.asarray(params["params"]["layers_0"]["mlp"]["fc1"]["kernel"])
  fc2 = np.asarray(params["params"]["layers_1"]["mlp"]["fc2"]["kernel"])
  p1 = Permutation(rng.permutation(16), rng.permutation(32))
  p2 = Permutation(None, rng.permutation(16))  # one side may stay in order
  permutations = {"layers_0/mlp/fc1/kernel": p1, "params/layers_1/mlp/fc2/kernel": p2}
  moved = vnm_jax.tree_permute(params, permutations)
  np.testing.assert_array_equal(moved["params"]["layers_0"]["mlp"]["fc1"]["kernel"],
                                fc1[p1.inputs][:, p1.outputs])
  np.testing.assert_array_equal(moved["params"]["layers_1"]["mlp"]["fc2"]["kernel"],
                                fc2[:, p2.outputs])
  np.testing.assert_array_equal(moved["params"]["layers_1"]["mlp"]["fc1"]["kernel"],
                                params["params"]["layers_1"]["mlp"]["fc1"]["kernel"])
  back = vnm_jax.tree_unpermute(moved, permutations)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Masks (None where dense) pass through; V:N:M groups of the permuted kernel are the
  # permutation's groups of the original one.
  masks = tree_masks(moved, CONFIG)
  original = vnm_jax.tree_unpermute(masks, permutations)
  expected = vnm_mask(fc1, CONFIG, permutation=p1)
  np.testing.assert_array_equal(
      original["params"]["layers_0"]["mlp"]["fc1"]["kernel"], expected)
  assert original["params"]["embed"]["embedding"] is None


def test_tree_permute_under_jit_with_traced_permutations_and_on_nnx_state():
  state = nnx.state(NnxLM(nnx.Rngs(0)), nnx.Param)
  rng = np.random.default_rng(4)
  path = "layers/0/mlp/fc2/kernel"
  permutations = {path: Permutation(jnp.asarray(rng.permutation(32)),
                                    jnp.asarray(rng.permutation(16)))}
  eager = vnm_jax.tree_permute(state, permutations)
  jitted = jax.jit(vnm_jax.tree_permute)(state, permutations)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kernel = np.asarray(state["layers"][0]["mlp"]["fc2"]["kernel"][...])
  np.testing.assert_array_equal(
      np.asarray(eager["layers"][0]["mlp"]["fc2"]["kernel"][...]),
      kernel[np.asarray(permutations[path].inputs)][:, np.asarray(permutations[path].outputs)])


def test_tree_permute_errors():
  params = linen_params()
  with pytest.raises(ValueError, match="permutations has entries for paths that are not in "
                     "params: 'other/kernel'"):
    vnm_jax.tree_permute(params, {"other/kernel": Permutation(np.arange(2), None)})
  with pytest.raises(ValueError, match=r"a Permutation reorders a 2D \(in, out\) kernel"):
    vnm_jax.tree_permute(params, {"layers_0/mlp/fc1/bias": Permutation(np.arange(32), None)})
  with pytest.raises(ValueError, match="is not a permutation"):
    vnm_jax.tree_permute(params, {"layers_0/mlp/fc1/kernel": Permutation(np.zeros(16, int),
                                                                         None)})
