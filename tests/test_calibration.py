import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vnm_jax.calibration import collect_input_norms
from vnm_jax.trees import tree_masks


def calibration_batches(count=3, shape=(2, 5, 6)):
  rng = np.random.default_rng(0)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def column_norms(rows):
  """||X_j||_2 over all tokens, by numpy on the (tokens, features) inputs."""
  rows = np.concatenate([np.asarray(r, np.float64).reshape(-1, r.shape[-1]) for r in rows])
  return np.sqrt((rows ** 2).sum(axis=0))


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x, scale=1.0):
    h = nn.relu(nn.Dense(8, name="fc1")(x * scale))
    y = nn.Dense(4, name="fc2")(h)
    # (..., 4) -> (..., 2, 2), contracted over both trailing axes: fan_in 4.
    return nn.DenseGeneral(3, axis=(-2, -1), name="proj")(y.reshape(*y.shape[:-1], 2, 2))


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)])
    self.proj = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), rngs=rngs)
    self.unused = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.layers[0](x))
    y = self.layers[1](h)
    return self.proj(y.reshape(*y.shape[:-1], 2, 2))


def linen_layer_inputs(params, batches, scale=1.0):
  """The inputs of fc1, fc2, proj, computed by hand with numpy."""
  fc1, fc2 = params["fc1"], params["fc2"]
  xs, hs, ys = [], [], []
  for x in batches:
    x = np.asarray(x, np.float64) * scale
    h = np.maximum(x @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"]), 0)
    y = h @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"])
    xs.append(x), hs.append(h), ys.append(y)
  return xs, hs, ys


def test_linen_norms_match_hand_computed():
  model = LinenMLP()
  batches = calibration_batches()
  variables = model.init(jax.random.key(0), batches[0])
  norms = collect_input_norms(model, batches, variables=variables, progress=False)
  xs, hs, ys = linen_layer_inputs(variables["params"], batches)
  assert set(norms) == {"fc1/kernel", "fc2/kernel", "proj/kernel"}
  np.testing.assert_allclose(norms["fc1/kernel"], column_norms(xs), rtol=1e-5)
  np.testing.assert_allclose(norms["fc2/kernel"], column_norms(hs), rtol=1e-5)
  # proj's kernel is (2, 2, 3); its flattened input index 2*a + b is y[..., 2*a + b].
  np.testing.assert_allclose(norms["proj/kernel"], column_norms(ys), rtol=1e-5)
  assert norms["proj/kernel"].shape == (4,)
  assert all(n.dtype == jnp.float32 for n in norms.values())


def test_linen_call_passes_arguments_and_filter_selects():
  model = LinenMLP()
  batches = calibration_batches(count=2)
  variables = model.init(jax.random.key(1), batches[0])
  norms = collect_input_norms(model, batches, variables=variables, filter=r"^fc1/",
                              call=lambda forward, batch: forward(batch, scale=2.0),
                              progress=False)
  assert set(norms) == {"fc1/kernel"}
  xs, _, _ = linen_layer_inputs(variables["params"], batches, scale=2.0)
  np.testing.assert_allclose(norms["fc1/kernel"], column_norms(xs), rtol=1e-5)


class LinenShared(nn.Module):
  """One Dense applied twice, and a BatchNorm that needs a mutable collection."""

  @nn.compact
  def __call__(self, x, train=False):
    dense = nn.Dense(6, name="shared")
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return dense(jnp.tanh(dense(x)))


def test_linen_shared_layer_accumulates_and_mutable_passes_through():
  model = LinenShared()
  batches = calibration_batches(count=2)
  variables = model.init(jax.random.key(2), batches[0])

  def call(forward, batch):
    out, mutated = forward(batch, train=True, mutable=["batch_stats"])
    assert "batch_stats" in mutated
    return out

  norms = collect_input_norms(model, batches, variables=variables, call=call, progress=False)
  inputs = []
  for x in batches:
    x = np.asarray(x, np.float64)
    mean, var = x.reshape(-1, 6).mean(0), x.reshape(-1, 6).var(0)
    normed = (x - mean) / np.sqrt(var + 1e-5)  # BatchNorm in training mode, scale 1, bias 0
    kernel, bias = (np.asarray(variables["params"]["shared"][k]) for k in ("kernel", "bias"))
    inputs += [normed, np.tanh(normed @ kernel + bias)]
  np.testing.assert_allclose(norms["shared/kernel"], column_norms(inputs), rtol=1e-4)


def nnx_layer_inputs(model, batches):
  first, second = model.layers[0], model.layers[1]
  xs, hs, ys = [], [], []
  for x in batches:
    x = np.asarray(x, np.float64)
    h = np.maximum(x @ np.asarray(first.kernel[...]) + np.asarray(first.bias[...]), 0)
    y = h @ np.asarray(second.kernel[...]) + np.asarray(second.bias[...])
    xs.append(x), hs.append(h), ys.append(y)
  return xs, hs, ys


def test_nnx_norms_match_hand_computed_and_model_is_untouched():
  model = NnxMLP(nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model))
  batches = calibration_batches()
  norms = collect_input_norms(model, batches, progress=False)
  xs, hs, ys = nnx_layer_inputs(model, batches)
  # The never-called layer is left out under the default (record what runs) filter.
  assert set(norms) == {"layers/0/kernel", "layers/1/kernel", "proj/kernel"}
  np.testing.assert_allclose(norms["layers/0/kernel"], column_norms(xs), rtol=1e-5)
  np.testing.assert_allclose(norms["layers/1/kernel"], column_norms(hs), rtol=1e-5)
  np.testing.assert_allclose(norms["proj/kernel"], column_norms(ys), rtol=1e-5)
  assert type(model.layers[0]) is nnx.Linear
  assert not hasattr(model.layers[0], "vnm_input_sq_sum")
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_nnx_norms_feed_wanda_masks():
  model = NnxMLP(nnx.Rngs(1))
  norms = collect_input_norms(model, calibration_batches(count=1), progress=False)
  state = nnx.state(model, nnx.Param)
  masks = tree_masks(state, "2:2:4", score="wanda", input_norms=norms, filter=r"layers/\d/kernel")
  assert masks["layers"][0]["kernel"][...].shape == (6, 8)


def test_filter_selecting_unrecordable_or_unused_layer_raises():
  model = NnxMLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"no inputs were recorded for kernels \['unused/kernel'\]"):
    collect_input_norms(model, calibration_batches(count=1), filter="unused", progress=False)
  with pytest.raises(ValueError, match="filter='nothing' selected no kernel"):
    collect_input_norms(model, calibration_batches(count=1), filter="nothing", progress=False)
  with pytest.raises(ValueError, match="filter has an invalid regular expression"):
    collect_input_norms(model, calibration_batches(count=1), filter="(", progress=False)


def test_argument_errors():
  nnx_model = NnxMLP(nnx.Rngs(0))
  linen_model = LinenMLP()
  batches = calibration_batches(count=1)
  with pytest.raises(ValueError, match="variables must be the linen model's variables"):
    collect_input_norms(linen_model, batches, progress=False)
  with pytest.raises(ValueError, match="variables is only for linen models"):
    collect_input_norms(nnx_model, batches, variables={"params": {}}, progress=False)
  with pytest.raises(TypeError, match="model must be a flax.linen.Module or a flax.nnx.Module"):
    collect_input_norms(lambda x: x, batches, progress=False)
  with pytest.raises(ValueError, match="batches yielded no batch"):
    collect_input_norms(nnx_model, [], progress=False)
  with pytest.raises(TypeError, match="call must be a function"):
    collect_input_norms(nnx_model, batches, call="forward", progress=False)
