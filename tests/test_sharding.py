"""Sparse training under a jax.sharding.Mesh (8 CPU devices) against one device.

A small Llama (vnm_jax.models.llama) is trained with SR-STE and with three-stage LoRA,
once on a single device and once with the batch split over the "data" axis and the
kernels over the "model" axis (column-parallel q/k/v/gate/up, row-parallel o/down).
The meshes use Auto axes (GSPMD propagation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vnm_jax.config import VNMConfig
from vnm_jax.lora import init_lora, lora_params, three_stage_lora
from vnm_jax.masks import vnm_mask
from vnm_jax.models.llama import Llama, LlamaConfig
from vnm_jax.sparse_training import sparse_params, sr_ste
from vnm_jax.trees import path_str, tree_configs

# Shard sizes (16 or 32 per device) are multiples of V and M: blocks never straddle devices.
CONFIG = VNMConfig(8, 2, 8)
MODEL = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=16)
ROW_PARALLEL = ("o_proj", "down_proj")
STEPS = 4


def auto_mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def kernel_spec(path: str, leaf) -> P:
  if not path.endswith("kernel") or leaf.ndim != 2:
    return P()
  return P("model", None) if any(name in path for name in ROW_PARALLEL) else P(None, "model")


def shardings(mesh, params):
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, kernel_spec(path_str(path), leaf)), params)


def setup():
  graphdef, params = nnx.split(Llama(MODEL, rngs=nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (STEPS, 8, 12), 0, MODEL.vocab_size)
  return graphdef, params, tokens


def lm_loss(graphdef, params, tokens):
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def run_sr_ste(mesh=None):
  graphdef, params, tokens = setup()
  tx = sr_ste(optax.adamw(1e-2), tree_configs(params, CONFIG))
  batch_sharding = None
  if mesh is not None:
    params = jax.device_put(params, shardings(mesh, params))
    batch_sharding = NamedSharding(mesh, P("data", None))
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(graphdef, sparse_params(p, state), batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for t in range(STEPS):
    batch = tokens[t] if mesh is None else jax.device_put(tokens[t], batch_sharding)
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return params, state, losses


def run_lora(mesh=None):
  graphdef, base, tokens = setup()
  adapters = init_lora(jax.random.key(2), base, rank=4, alpha=8.0)
  tx = three_stage_lora(optax.adam(1e-2), tree_configs(base, CONFIG), total_steps=STEPS,
                        dense_steps=1, dynamic_steps=2)
  batch_sharding = None
  if mesh is not None:
    base = jax.device_put(base, shardings(mesh, base))
    adapters = jax.device_put(adapters, NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P("data", None))
  state = jax.jit(tx.init)(adapters)

  @jax.jit
  def step(base, adapters, state, batch):
    loss, grads = jax.value_and_grad(
        lambda ad: lm_loss(graphdef, lora_params(base, ad, state), batch))(adapters)
    updates, state = tx.update(grads, state, adapters, base=base)
    return optax.apply_updates(adapters, updates), state, loss

  losses = []
  for t in range(STEPS):
    batch = tokens[t] if mesh is None else jax.device_put(tokens[t], batch_sharding)
    adapters, state, loss = step(base, adapters, state, batch)
    losses.append(float(loss))
  return base, state, losses


def kernel_paths(tree):
  return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if path_str(p).endswith("kernel") and leaf.ndim == 2 and "embed" not in path_str(p)]


def assert_same_masks(sharded, single):
  masks_sharded, masks_single = kernel_paths(sharded), kernel_paths(single)
  assert len(masks_sharded) == 7
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
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                               err_msg=path)


def test_three_stage_lora_sharded_matches_single_device():
  mesh = auto_mesh()
  _, state_single, losses_single = run_lora()
  base_sharded, state_sharded, losses_sharded = run_lora(mesh)
  assert int(state_sharded.stage) == 3 and int(state_sharded.mask_changes) >= 1
  np.testing.assert_allclose(losses_sharded, losses_single, rtol=1e-5)
  assert_same_masks(state_sharded.masks, state_single.masks)


def test_mask_of_a_sharded_kernel_equals_the_unsharded_mask():
  mesh = auto_mesh()
  kernel = jax.random.normal(jax.random.key(3), (128, 256))
  expected = np.asarray(vnm_mask(kernel, CONFIG))
  for spec in (P(None, "model"), P("model", None), P("data", "model")):
    sharding = NamedSharding(mesh, spec)
    mask = jax.jit(lambda w: vnm_mask(w, CONFIG), out_shardings=sharding)(
        jax.device_put(kernel, sharding))
    np.testing.assert_array_equal(np.asarray(mask), expected, err_msg=str(spec))
