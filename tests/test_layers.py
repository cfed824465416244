"""VNMLinear / VNMDense and convert_to_vnm against the dense layers with masked kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vnm_jax import (Permutation, PreparedVNMWeight, VNMConfig, VNMWeight, compress, decompress,
                     tree_configs, vnm_mask)
from vnm_jax.checkpoint import Checkpointer
from vnm_jax.layers import VNMDense, VNMIndex, VNMLinear, VNMPrepared, convert_to_vnm
from vnm_jax.trees import tree_masks

RTOL, ATOL = 1e-5, 1e-5  # float32, values of order 1-10


class Net(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(40, 64, rngs=rngs), nnx.Linear(64, 40, rngs=rngs)])
    self.head = nnx.Linear(40, 3, use_bias=False, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = jax.nn.relu(block(x))
    return self.head(x)


def masked_forward(model, masks, x):
  """The dense model with every masked kernel multiplied by its mask."""
  state = nnx.state(model, nnx.Param)
  masked = jax.tree.map(lambda m, p: p if m is None else p * m, masks, state,
                        is_leaf=lambda v: v is None)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, masked, rest)(x)


def linear_and_mask(seed=0):
  linear = nnx.Linear(40, 64, rngs=nnx.Rngs(seed))
  linear.bias[...] = jax.random.normal(jax.random.key(seed + 1), (64,))
  return linear, vnm_mask(linear.kernel[...], "32:2:5")


def test_prepared_layer_matches_masked_dense_and_holds_what_it_runs():
  linear, mask = linear_and_mask()
  layer = VNMLinear.from_linear(linear, "32:2:5", mask=mask)
  x = jax.random.normal(jax.random.key(2), (3, 4, 40))
  expected = x @ (linear.kernel[...] * mask) + linear.bias[...]
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=RTOL, atol=ATOL)
  # The weight is constant: only the bias trains; the layout is held, not rebuilt per call.
  assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"bias"}
  assert set(nnx.to_pure_dict(nnx.state(layer, VNMIndex))) == {"meta", "columns"}
  assert set(nnx.to_pure_dict(nnx.state(layer, VNMPrepared))) == {"layout"}  # holds the values
  assert isinstance(layer.prepared, PreparedVNMWeight)
  expected_weight = compress(linear.kernel[...], "32:2:5", mask=mask)
  for a, b in zip(jax.tree.leaves(layer.weight), jax.tree.leaves(expected_weight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  grad_x = jax.grad(lambda x: jnp.sum(layer(x) ** 2))(x)
  expected_grad = jax.grad(lambda x: jnp.sum(
      (x @ (linear.kernel[...] * mask) + linear.bias[...]) ** 2))(x)
  np.testing.assert_allclose(np.asarray(grad_x), np.asarray(expected_grad), rtol=1e-4,
                             atol=1e-4 * np.abs(np.asarray(expected_grad)).max())
  grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer))
  assert set(grads) == {"bias"}


def test_prepared_layer_in_another_dtype_keeps_the_stored_values():
  linear, mask = linear_and_mask(2)
  weight = compress(linear.kernel[...], "32:2:5", mask=mask)
  layer = VNMLinear(weight, linear.bias[...], dtype=jnp.bfloat16)
  assert layer.prepared.dtype == jnp.bfloat16 and layer.values[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(layer.weight.values), np.asarray(weight.values))
  x = jax.random.normal(jax.random.key(3), (2, 40))
  expected = x @ (linear.kernel[...] * mask) + linear.bias[...]
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(expected), rtol=2e-2,
                             atol=2e-2 * float(jnp.abs(expected).max()))


def test_unprepared_layer_is_trainable():
  linear, mask = linear_and_mask(3)
  layer = VNMLinear.from_linear(linear, "32:2:5", mask=mask, prepare=False)
  assert layer.prepared is None and layer.layout is None
  assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"values", "bias"}
  x = jax.random.normal(jax.random.key(4), (5, 40))
  np.testing.assert_allclose(np.asarray(layer(x)),
                             np.asarray(x @ (linear.kernel[...] * mask) + linear.bias[...]),
                             rtol=RTOL, atol=ATOL)
  grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer))
  assert grads["values"].shape == layer.values[...].shape
  assert float(jnp.abs(grads["values"]).sum()) > 0


def test_convert_nnx_model_in_one_call():
  model = Net(nnx.Rngs(0))
  masks = tree_masks(nnx.state(model, nnx.Param), "32:2:5")  # default filter: head stays dense
  x = jax.random.normal(jax.random.key(3), (7, 40))
  expected = masked_forward(model, masks, x)
  converted = convert_to_vnm(model, masks, "32:2:5")
  assert converted is model
  assert all(isinstance(block, VNMLinear) for block in model.blocks)
  assert isinstance(model.head, nnx.Linear)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)),
                             np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_convert_nnx_with_permutation_and_per_path_configs():
  model = Net(nnx.Rngs(1))
  kernel = model.blocks[0].kernel[...]
  rng = np.random.default_rng(0)
  permutation = Permutation(rng.permutation(40), rng.permutation(64))
  masks = {"blocks/0/kernel": vnm_mask(kernel, "32:2:5", permutation=permutation),
           "blocks/1/kernel": vnm_mask(model.blocks[1].kernel[...], "16:2:8")}
  x = jax.random.normal(jax.random.key(4), (2, 40))
  h = jax.nn.relu(x @ (kernel * masks["blocks/0/kernel"]) + model.blocks[0].bias[...])
  h = jax.nn.relu(h @ (model.blocks[1].kernel[...] * masks["blocks/1/kernel"])
                  + model.blocks[1].bias[...])
  expected = h @ model.head.kernel[...]
  convert_to_vnm(model, masks, {r"blocks/0": "32:2:5", r"blocks/1": "16:2:8"},
                 permutations={"blocks/0/kernel": permutation})
  assert model.blocks[0].output_index is not None and model.blocks[1].output_index is None
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_convert_nnx_with_a_per_kernel_config_tree():
  # Mixed configs as a per-layer allocation produces them: tree_configs' tree, head included.
  model = Net(nnx.Rngs(5))
  params = nnx.state(model, nnx.Param)
  configs = tree_configs(params, "32:2:5", filter=r"kernel$",
                         configs={"blocks/1": "16:2:8", "head": "8:2:4"})
  masks = tree_masks(params, "32:2:5", filter=r"kernel$",
                     configs={"blocks/1": "16:2:8", "head": "8:2:4"})
  x = jax.random.normal(jax.random.key(6), (3, 40))
  expected = masked_forward(model, masks, x)
  convert_to_vnm(model, masks, configs)
  assert [model.blocks[0].config, model.blocks[1].config, model.head.config] == [
      VNMConfig(32, 2, 5), VNMConfig(16, 2, 8), VNMConfig(8, 2, 4)]
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_converted_model_state_round_trips_through_a_checkpoint(tmp_path):
  masks = lambda m: tree_masks(nnx.state(m, nnx.Param), "32:2:5")
  model = Net(nnx.Rngs(7))
  convert_to_vnm(model, masks(model), "32:2:5")
  other = Net(nnx.Rngs(8))  # Same structure, other weights and layout.
  convert_to_vnm(other, masks(other), "32:2:5")
  x = jax.random.normal(jax.random.key(9), (4, 40))
  with Checkpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(0, nnx.state(model))
    nnx.update(other, checkpointer.restore(nnx.state(other)))
  np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))
  # Not prepared: the variable structure of earlier versions (their checkpoints restore).
  old_style = Net(nnx.Rngs(7))
  convert_to_vnm(old_style, masks(old_style), "32:2:5", prepare=False)
  assert set(nnx.to_pure_dict(nnx.state(old_style.blocks[0]))) == {"values", "meta", "columns",
                                                                 "bias"}


class DenseMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Dense(64, name="fc1")(x))  # fc1: (40, 64)
    return nn.Dense(5, name="fc2")(x)


class SparseMLP(nn.Module):
  """DenseMLP with fc1 compressed: same module names, VNMDense in place of nn.Dense."""
  permuted_outputs: bool = False
  prepare: bool = True

  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(VNMDense(64, in_features=40, config="32:2:5", name="fc1",
                             permuted_outputs=self.permuted_outputs, prepare=self.prepare)(x))
    return nn.Dense(5, name="fc2")(x)


@pytest.mark.parametrize("permuted, prepare", [(False, True), (True, True), (True, False)])
def test_convert_linen_variables(permuted, prepare):
  x = jax.random.normal(jax.random.key(5), (6, 40))
  variables = DenseMLP().init(jax.random.key(6), x)
  kernel = variables["params"]["fc1"]["kernel"]
  permutation = None
  if permuted:
    rng = np.random.default_rng(1)
    permutation = Permutation(rng.permutation(40), rng.permutation(64))
  mask = vnm_mask(kernel, "32:2:5", permutation=permutation)
  masked = jax.tree.map(lambda a: a, variables)
  masked["params"]["fc1"]["kernel"] = kernel * mask
  expected = DenseMLP().apply(masked, x)
  converted = convert_to_vnm(variables, {"params/fc1/kernel": mask}, "32:2:5",
                             permutations={"fc1/kernel": permutation} if permuted else None,
                             prepare=prepare)
  assert "kernel" in variables["params"]["fc1"]  # the input is not modified
  index = {"meta", "columns"} | ({"output_index"} if permuted else set())
  if prepare:
    assert set(converted["params"]["fc1"]) == {"bias"}
    assert set(converted["vnm"]["fc1"]) == index | {"layout"}
  else:
    assert set(converted["params"]["fc1"]) == {"values", "bias"}
    assert set(converted["vnm"]["fc1"]) == index
  y = SparseMLP(permuted_outputs=permuted, prepare=prepare).apply(converted, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("prepare", [True, False])
def test_vnm_dense_init_shapes(prepare):
  variables = SparseMLP(prepare=prepare).init(jax.random.key(0), jnp.ones((2, 40)))
  if prepare:
    assert "values" not in variables["vnm"]["fc1"]
    assert variables["vnm"]["fc1"]["layout"].condensed.shape == (2, 4 * 8, 32)
  else:
    assert variables["params"]["fc1"]["values"].shape == (2, 2, 8, 32)
  assert variables["vnm"]["fc1"]["columns"].shape == (2, 4, 8)
  assert variables["vnm"]["fc1"]["meta"].shape == (2, 8, 16)
  # The placeholder layout is valid: zero values give zero pre-activations.
  y = SparseMLP(prepare=prepare).apply(variables, jnp.ones((2, 40)))
  assert y.shape == (2, 5) and np.isfinite(np.asarray(y)).all()


def test_bad_inputs_raise():
  model = Net(nnx.Rngs(2))
  mask = vnm_mask(model.blocks[0].kernel[...], "32:2:5")
  with pytest.raises(ValueError, match=r"masks has entries for \['nope/kernel'\], which are not"):
    convert_to_vnm(model, {"blocks/0/kernel": mask, "nope/kernel": mask}, "32:2:5")
  assert isinstance(model.blocks[0], nnx.Linear)  # nothing converted
  with pytest.raises(ValueError, match="config has no pattern matching 'blocks/0/kernel'"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, {"head": "32:2:5"})
  with pytest.raises(ValueError, match="config tree has no VNMConfig for 'blocks/0/kernel'"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, {"head": {"kernel": "32:2:5"}})
  with pytest.raises(TypeError, match="config must be a VNMConfig"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, 5)
  assert isinstance(model.blocks[0], nnx.Linear)
  with pytest.raises(TypeError, match="must be an nnx.Module or a linen variables dict"):
    convert_to_vnm([1, 2], {"a/kernel": mask}, "32:2:5")
  with pytest.raises(ValueError, match="masks holds no mask"):
    convert_to_vnm(model, {}, "32:2:5")
  with pytest.raises(ValueError, match="implementation must be one of"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, "32:2:5", implementation="gpu")


def test_damaged_or_zero_size_weights_raise():
  w = compress(jax.random.normal(jax.random.key(0), (40, 64)), "32:2:5")
  damaged = VNMWeight(w.values, w.meta, w.columns.at[1, 2, 3].set(-1), None, w.shape, w.config)
  with pytest.raises(ValueError, match=r"VNMWeight.columns\[1, 2, 3\] = -1 is out of range"):
    VNMLinear(damaged)
  with pytest.raises(ValueError, match=r"kernel has a zero-size dimension: shape \(0, 8\)"):
    empty = nnx.Linear(1, 8, rngs=nnx.Rngs(0))
    empty.kernel = nnx.Param(jnp.zeros((0, 8)))
    VNMLinear.from_linear(empty, "8:2:4")
  with pytest.raises(ValueError, match=r"zero-size dimension: shape \(40, 0\)"):
    VNMDense(0, in_features=40, config="8:2:4").init(jax.random.key(0), jnp.ones((1, 40)))
  np.testing.assert_array_equal(np.asarray(decompress(VNMLinear(w).weight)),
                                np.asarray(decompress(w)))
