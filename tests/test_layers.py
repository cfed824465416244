"""VNMLinear / VNMDense and convert_to_vnm against the dense layers with masked kernels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vnm_jax import Permutation, vnm_mask
from vnm_jax.layers import VNMDense, VNMIndex, VNMLinear, convert_to_vnm
from vnm_jax.trees import tree_masks


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


def test_from_linear_matches_masked_dense_and_is_trainable():
  linear = nnx.Linear(40, 64, rngs=nnx.Rngs(0))
  linear.bias[...] = jax.random.normal(jax.random.key(1), (64,))
  mask = vnm_mask(linear.kernel[...], "32:2:5")
  layer = VNMLinear.from_linear(linear, "32:2:5", mask=mask)
  x = jax.random.normal(jax.random.key(2), (3, 4, 40))
  expected = x @ (linear.kernel[...] * mask) + linear.bias[...]
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
  trainable = nnx.state(layer, nnx.Param)
  assert set(nnx.to_pure_dict(trainable)) == {"values", "bias"}
  assert set(nnx.to_pure_dict(nnx.state(layer, VNMIndex))) == {"meta", "columns"}
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
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)


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
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


class DenseMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Dense(64, name="fc1")(x))  # fc1: (40, 64)
    return nn.Dense(5, name="fc2")(x)


class SparseMLP(nn.Module):
  """DenseMLP with fc1 compressed: same module names, VNMDense in place of nn.Dense."""
  permuted_outputs: bool = False

  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(VNMDense(64, in_features=40, config="32:2:5", name="fc1",
                             permuted_outputs=self.permuted_outputs)(x))
    return nn.Dense(5, name="fc2")(x)


@pytest.mark.parametrize("permuted", [False, True])
def test_convert_linen_variables(permuted):
  x = jax.random.normal(jax.random.key(5), (6, 40))
  variables = DenseMLP().init(jax.random.key(6), x)
  kernel = variables["params"]["fc1"]["kernel"]
  permutations = None
  permutation = None
  if permuted:
    rng = np.random.default_rng(1)
    permutation = Permutation(rng.permutation(40), rng.permutation(64))
    permutations = {"fc1/kernel": permutation}
  mask = vnm_mask(kernel, "32:2:5", permutation=permutation)
  masks = {"params/fc1/kernel": mask}
  masked = jax.tree.map(lambda a: a, variables)
  masked["params"]["fc1"]["kernel"] = kernel * mask
  expected = DenseMLP().apply(masked, x)
  converted = convert_to_vnm(variables, masks, "32:2:5", permutations=permutations)
  assert "kernel" in variables["params"]["fc1"]  # the input is not modified
  assert set(converted["params"]["fc1"]) == {"values", "bias"}
  assert set(converted["vnm"]["fc1"]) == ({"meta", "columns", "output_index"} if permuted
                                          else {"meta", "columns"})
  y = SparseMLP(permuted_outputs=permuted).apply(converted, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_vnm_dense_init_shapes():
  variables = SparseMLP().init(jax.random.key(0), jnp.ones((2, 40)))
  assert variables["params"]["fc1"]["values"].shape == (2, 2, 8, 32)
  assert variables["vnm"]["fc1"]["columns"].shape == (2, 4, 8)
  assert variables["vnm"]["fc1"]["meta"].shape == (2, 8, 16)
  # The placeholder layout is valid: zero values give zero pre-activations.
  y = SparseMLP().apply(variables, jnp.ones((2, 40)))
  assert y.shape == (2, 5) and np.isfinite(np.asarray(y)).all()


def test_bad_inputs_raise():
  model = Net(nnx.Rngs(2))
  mask = vnm_mask(model.blocks[0].kernel[...], "32:2:5")
  with pytest.raises(ValueError, match=r"masks has entries for \['nope/kernel'\], which are not"):
    convert_to_vnm(model, {"blocks/0/kernel": mask, "nope/kernel": mask}, "32:2:5")
  assert isinstance(model.blocks[0], nnx.Linear)  # nothing converted
  with pytest.raises(ValueError, match="config has no pattern matching 'blocks/0/kernel'"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, {"head": "32:2:5"})
  with pytest.raises(TypeError, match="must be an nnx.Module or a linen variables dict"):
    convert_to_vnm([1, 2], {"a/kernel": mask}, "32:2:5")
  with pytest.raises(ValueError, match="masks holds no mask"):
    convert_to_vnm(model, {}, "32:2:5")
  with pytest.raises(ValueError, match="implementation must be one of"):
    convert_to_vnm(model, {"blocks/0/kernel": mask}, "32:2:5", implementation="gpu")
