"""Sparse training under a jax.sharding.Mesh (8 CPU devices) against one device.

A residual stack of Megatron-style MLP blocks is trained with SR-STE and with
three-stage LoRA, once on a single device and once with the batch split over the
"data" axis and the kernels over the "model" axis (column-parallel ``up``,
row-parallel ``down``). The meshes use Auto axes (GSPMD propagation); the state is
placed like the params (masks and moments like their kernels) so that the jitted
step compiles once.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vnm_jax.config import VNMConfig
from vnm_jax.lora import init_lora, lora_params, three_stage_lora
from vnm_jax.masks import vnm_mask
from vnm_jax.sparse_training import sparse_params, sr_ste
from vnm_jax.trees import path_str, tree_configs

# Shard sizes (32 per device) are multiples of V and M: blocks never straddle devices.
CONFIG = VNMConfig(8, 2, 8)
WIDTH, HIDDEN, BLOCKS, STEPS = 64, 128, 2, 3


def auto_mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def kernel_spec(path: str, leaf) -> P:
  """Column-parallel up (outputs and bias split), row-parallel down (inputs split).

  Masks and optimizer moments follow their kernels (same path ending); a LoRA adapter
  splits the kernel's split axis: b (r, N) of up, a (K, r) of down. The rest is replicated.
  """
  if re.search(r"up/(kernel|kernel/b)$", path) and leaf.ndim == 2:
    return P(None, "model")
  if re.search(r"up/bias$", path):
    return P("model")
  if re.search(r"down/(kernel|kernel/a)$", path) and leaf.ndim == 2:
    return P("model", None)
  return P()


def shardings(mesh, tree):
  """Shardings by path, for params and for states (masks and moments follow their kernels)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, kernel_spec(path_str(path), leaf)), tree)


def setup():
  rng = np.random.default_rng(0)
  params = {f"block{i}": {"up": {"kernel": jnp.asarray(rng.standard_normal((WIDTH, HIDDEN))
                                                       / np.sqrt(WIDTH), jnp.float32),
                                 "bias": jnp.zeros(HIDDEN, jnp.float32)},
                          "down": {"kernel": jnp.asarray(rng.standard_normal((HIDDEN, WIDTH))
                                                         / np.sqrt(HIDDEN), jnp.float32)}}
            for i in range(BLOCKS)}
  inputs = jax.random.normal(jax.random.key(1), (STEPS, 32, WIDTH))
  return params, inputs


def loss_fn(params, x):
  h = x
  for i in range(BLOCKS):
    block = params[f"block{i}"]
    h = h + jax.nn.gelu(h @ block["up"]["kernel"] + block["up"]["bias"]) @ block["down"]["kernel"]
  return jnp.mean((h - jnp.roll(x, 1, axis=-1)) ** 2)


def run_sr_ste(mesh=None):
  params, inputs = setup()
  tx = sr_ste(optax.adamw(1e-2), tree_configs(params, CONFIG))
  state = tx.init(params)
  if mesh is not None:
    params = jax.device_put(params, shardings(mesh, params))
    state = jax.device_put(state, shardings(mesh, state))
    inputs = jax.device_put(inputs, NamedSharding(mesh, P(None, "data", None)))

  @jax.jit
  def step(params, state, x):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(sparse_params(p, state), x))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for t in range(STEPS):
    params, state, loss = step(params, state, inputs[t])
    losses.append(float(loss))
  return params, state, losses


def run_lora(mesh=None):
  base, inputs = setup()
  adapters = init_lora(jax.random.key(2), base, rank=4, alpha=8.0)
  tx = three_stage_lora(optax.adam(1e-2), tree_configs(base, CONFIG), total_steps=STEPS,
                        dense_steps=1, dynamic_steps=1)
  state = tx.init(adapters)
  if mesh is not None:
    base = jax.device_put(base, shardings(mesh, base))
    adapters = jax.device_put(adapters, shardings(mesh, adapters))
    state = jax.device_put(state, shardings(mesh, state))
    inputs = jax.device_put(inputs, NamedSharding(mesh, P(None, "data", None)))

  @jax.jit
  def step(base, adapters, state, x):
    loss, grads = jax.value_and_grad(
        lambda ad: loss_fn(lora_params(base, ad, state), x))(adapters)
    updates, state = tx.update(grads, state, adapters, base=base)
    return optax.apply_updates(adapters, updates), state, loss

  losses = []
  for t in range(STEPS):
    adapters, state, loss = step(base, adapters, state, inputs[t])
    losses.append(float(loss))
  return base, state, losses


def kernel_paths(tree):
  return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if path_str(p).endswith("kernel")]


def assert_same_masks(sharded, single):
  masks_sharded, masks_single = kernel_paths(sharded), kernel_paths(single)
  assert len(masks_sharded) == 2 * BLOCKS
  for (path, a), (_, b) in zip(masks_sharded, masks_single):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def test_sr_ste_sharded_matches_single_device():
  mesh = auto_mesh()
  params_single, state_single, losses_single = run_sr_ste()
  params_sharded, state_sharded, losses_sharded = run_sr_ste(mesh)
  np.testing.assert_allclose(losses_sharded, losses_single, rtol=1e-5)
  assert_same_masks(state_sharded.masks, state_single.masks)
  for (path, kernel), (_, mask) in zip(kernel_paths(params_sharded),
                                       kernel_paths(state_sharded.masks)):
    expected = NamedSharding(mesh, kernel_spec(path, kernel))
    assert kernel.sharding.is_equivalent_to(expected, 2), path
    assert mask.sharding.is_equivalent_to(expected, 2), f"mask of {path} is not sharded"
  for (path, a), (_, b) in zip(kernel_paths(params_sharded), kernel_paths(params_single)):
    # Adam divides by sqrt(v): entries with tiny gradients amplify reduction-order noise.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=3e-4,
                               err_msg=path)


def test_three_stage_lora_sharded_matches_single_device():
  mesh = auto_mesh()
  _, state_single, losses_single = run_lora()
  base_sharded, state_sharded, losses_sharded = run_lora(mesh)
  assert int(state_sharded.stage) == 3 and int(state_sharded.mask_changes) >= 1
  np.testing.assert_allclose(losses_sharded, losses_single, rtol=1e-5)
  assert_same_masks(state_sharded.masks, state_single.masks)
  for (path, kernel), (_, mask) in zip(kernel_paths(base_sharded),
                                       kernel_paths(state_sharded.masks)):
    assert mask.sharding.is_equivalent_to(kernel.sharding, 2), f"mask of {path} is not sharded"


def test_mask_of_a_sharded_kernel_equals_the_unsharded_mask():
  mesh = auto_mesh()
  kernel = jax.random.normal(jax.random.key(3), (128, 256))
  expected = np.asarray(vnm_mask(kernel, CONFIG))
  for spec in (P(None, "model"), P("model", None), P("data", "model")):
    sharding = NamedSharding(mesh, spec)
    mask = jax.jit(lambda w: vnm_mask(w, CONFIG), out_shardings=sharding)(
        jax.device_put(kernel, sharding))
    np.testing.assert_array_equal(np.asarray(mask), expected, err_msg=str(spec))
