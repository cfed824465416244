"""LoRA adapters, the three-stage sparse LoRA schedule and the sparsity-keeping merge."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vnm_reference as ref
from vnm_reference import assert_close
from vnm_jax.config import VNMConfig
from vnm_jax.format import compress, decompress
from vnm_jax.lora import (LoRAAdapter, ThreeStageLoRAState, default_stage_steps, init_lora,
                          lora_params, merge_lora, three_stage_lora)
from vnm_jax.masks import is_vnm, vnm_mask
from vnm_jax.permutation import Permutation
from vnm_jax.trees import tree_configs, tree_masks

CONFIG = VNMConfig(8, 2, 6)
RANK, ALPHA = 4, 8.0


def make_base(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "embed": {"embedding": jnp.asarray(rng.standard_normal((11, 37)), jnp.float32)},
      "dense1": {"kernel": jnp.asarray(rng.standard_normal((37, 21)), jnp.float32),
                 "bias": jnp.asarray(rng.standard_normal(21), jnp.float32)},
      "dense2": {"kernel": jnp.asarray(rng.standard_normal((21, 16)), jnp.float32)},
  }


def loss_fn(params, x):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"] - 1.0) ** 2)


def batch(step):
  return jax.random.normal(jax.random.fold_in(jax.random.key(3), step), (16, 37))


def effective_numpy(w, adapter, mask=None):
  a, b = np.asarray(adapter.a, np.float64), np.asarray(adapter.b, np.float64)
  out = np.asarray(w, np.float64) + adapter.scale * a @ b
  return out if mask is None else out * mask


def make_step(tx):
  @jax.jit
  def step(base, adapters, state, x):
    loss, grads = jax.value_and_grad(
        lambda ad: loss_fn(lora_params(base, ad, state), x))(adapters)
    updates, state = tx.update(grads, state, adapters, base=base)
    return optax.apply_updates(adapters, updates), state, loss, grads, updates
  return step


def test_init_lora_selects_kernels_and_starts_at_the_base():
  base = make_base()
  adapters = init_lora(jax.random.key(0), base, rank=RANK, alpha=ALPHA)
  assert adapters["embed"]["embedding"] is None and adapters["dense1"]["bias"] is None
  for name, (k, n) in (("dense1", (37, 21)), ("dense2", (21, 16))):
    adapter = adapters[name]["kernel"]
    assert isinstance(adapter, LoRAAdapter) and adapter.scale == ALPHA / RANK
    assert adapter.a.shape == (k, RANK) and adapter.b.shape == (RANK, n)
    assert np.all(np.asarray(adapter.b) == 0.0)
    a = np.asarray(adapter.a)
    assert np.all(np.abs(a) <= 1 / np.sqrt(k)) and np.std(a) > 0.2 / np.sqrt(k)
  # B = 0: the adapted model is the base model.
  jax.tree_util.tree_map(np.testing.assert_array_equal, lora_params(base, adapters), base)
  only_first = init_lora(jax.random.key(0), base, rank=2, filter="dense1/kernel$")
  assert only_first["dense2"]["kernel"] is None and only_first["dense1"]["kernel"].rank == 2


def test_dense_lora_forward_and_gradients_only_for_adapters():
  base = make_base(1)
  adapters = init_lora(jax.random.key(1), base, rank=RANK, alpha=ALPHA)
  adapters = jax.tree_util.tree_map(lambda x: x + 0.1, adapters)  # b != 0
  forward = lora_params(base, adapters)
  for name in ("dense1", "dense2"):
    np.testing.assert_allclose(np.asarray(forward[name]["kernel"]),
                               effective_numpy(base[name]["kernel"], adapters[name]["kernel"]),
                               rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda ad: loss_fn(lora_params(base, ad), batch(0)))(adapters)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  # Chain rule by hand: dL/da = s * dL/dW @ b^T, dL/db = s * a^T @ dL/dW.
  g_w = np.asarray(jax.grad(loss_fn)(forward, batch(0))["dense1"]["kernel"], np.float64)
  adapter = adapters["dense1"]["kernel"]
  assert_close(grads["dense1"]["kernel"].a, adapter.scale * g_w @ np.asarray(adapter.b).T,
               rtol=1e-4)
  assert_close(grads["dense1"]["kernel"].b, adapter.scale * np.asarray(adapter.a).T @ g_w,
               rtol=1e-4)


def test_stage_switches_and_mask_recomputation_at_configured_steps():
  base = make_base(2)
  adapters = init_lora(jax.random.key(2), base, rank=RANK, alpha=ALPHA)
  configs = tree_configs(base, CONFIG)
  assert configs["embed"]["embedding"] is None and configs["dense1"]["kernel"] == CONFIG
  dense, dynamic, every = 3, 5, 2
  tx = three_stage_lora(optax.adam(5e-2), configs, total_steps=14, dense_steps=dense,
                        dynamic_steps=dynamic, update_every=every)
  state = tx.init(adapters)
  assert isinstance(state, ThreeStageLoRAState) and int(state.stage) == 1
  step = make_step(tx)
  stages, masks_seen, changes = [int(state.stage)], [state.masks], [int(state.mask_changes)]
  adapter_history = [adapters]
  for t in range(14):
    adapters, state, *_ = step(base, adapters, state, batch(t))
    stages.append(int(state.stage))
    masks_seen.append(state.masks)
    changes.append(int(state.mask_changes))
    adapter_history.append(adapters)
    assert int(state.step) == t + 1
  assert stages == [1] * 3 + [2] * 5 + [3] * 7

  def expected_mask(t, name):
    w = effective_numpy(base[name]["kernel"], adapter_history[t][name]["kernel"])
    return ref.column_l1_mask(np.abs(w), CONFIG.v, CONFIG.m)

  # Masks are recomputed at steps 3, 5, 7 (stage 2, every 2) and 8 (entering stage 3).
  recompute_steps = {3, 5, 7, 8}
  current = {name: np.ones(base[name]["kernel"].shape, bool) for name in ("dense1", "dense2")}
  for t in range(15):
    for name in ("dense1", "dense2"):
      if t in recompute_steps:
        current[name] = expected_mask(t, name)
      np.testing.assert_array_equal(np.asarray(masks_seen[t][name]["kernel"]), current[name],
                                    err_msg=f"mask of {name} after {t} steps")
  assert changes[2] == 0 and changes[3] == 1 and changes[-1] == changes[8] <= 4
  assert masks_seen[-1]["dense1"]["bias"] is None


@pytest.mark.parametrize("score", ["wanda"])  # RIA: tests/test_sparse_training.py
def test_dynamic_masks_are_activation_aware_masks_of_the_effective_kernels(score):
  base = make_base(4)
  adapters = init_lora(jax.random.key(5), base, rank=RANK, alpha=ALPHA)
  configs = tree_configs(base, CONFIG)
  rng = np.random.default_rng(6)
  norms = {"dense1/kernel": jnp.asarray(rng.uniform(0.05, 4.0, 37), jnp.float32),
           "dense2/kernel": jnp.asarray(rng.uniform(0.05, 4.0, 21), jnp.float32)}
  permutations = {"dense1/kernel": Permutation(rng.permutation(37), rng.permutation(21))}
  dense, dynamic = 2, 3
  tx = three_stage_lora(optax.adam(5e-2), configs, total_steps=7, dense_steps=dense,
                        dynamic_steps=dynamic, score=score, input_norms=norms,
                        permutations=permutations)
  step = make_step(tx)
  state = tx.init(adapters)
  masks_at_stage_three = None
  for t in range(1, 8):
    adapters, state, *_ = step(base, adapters, state, batch(t))
    if t < dense:
      continue
    # Recomputed after steps 2, 3, 4 (stage 2) and 5 (entering stage 3), then fixed.
    effective = lora_params(base, adapters, None)
    expected = tree_masks(effective, CONFIG, score=score, input_norms=norms,
                          permutations=permutations)
    for name in ("dense1", "dense2"):
      mask = np.asarray(state.masks[name]["kernel"])
      assert is_vnm(mask, CONFIG, permutation=permutations.get(f"{name}/kernel")), (t, name)
      if t <= dense + dynamic:
        np.testing.assert_array_equal(mask, np.asarray(expected[name]["kernel"]),
                                      err_msg=f"{name} after {t} steps")
    if t == dense + dynamic:
      masks_at_stage_three = state.masks
  assert int(state.stage) == 3
  for name in ("dense1", "dense2"):
    np.testing.assert_array_equal(np.asarray(state.masks[name]["kernel"]),
                                  np.asarray(masks_at_stage_three[name]["kernel"]))
  with pytest.raises(ValueError, match="needs input_norms for every sparse leaf; missing "
                                       "'dense2/kernel'"):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=8, score=score,
                     input_norms={"dense1/kernel": norms["dense1/kernel"]})


def test_regulariser_only_in_stage_two_and_matches_hand_computed_gradient():
  lr, lam = 0.1, 0.05
  base = make_base(3)
  adapters = init_lora(jax.random.key(3), base, rank=RANK, alpha=ALPHA)
  configs = tree_configs(base, CONFIG, filter="dense1/kernel$")
  adapters = {**adapters, "dense2": {"kernel": adapters["dense2"]["kernel"]}}
  tx = three_stage_lora(optax.sgd(lr), configs, total_steps=6, dense_steps=2, dynamic_steps=2,
                        regularization=lam)
  state = tx.init(adapters)
  step = make_step(tx)
  for t in range(6):
    stage = int(state.stage)
    mask = np.asarray(state.masks["dense1"]["kernel"])
    previous = adapters
    adapters, state, _, grads, updates = step(base, adapters, state, batch(t))
    adapter = previous["dense1"]["kernel"]
    g_a = np.asarray(grads["dense1"]["kernel"].a, np.float64)
    g_b = np.asarray(grads["dense1"]["kernel"].b, np.float64)
    if stage == 2:
      residual = lam * effective_numpy(base["dense1"]["kernel"], adapter) * (1 - mask)
      g_a = g_a + adapter.scale * residual @ np.asarray(adapter.b, np.float64).T
      g_b = g_b + adapter.scale * np.asarray(adapter.a, np.float64).T @ residual
    np.testing.assert_allclose(np.asarray(updates["dense1"]["kernel"].a), -lr * g_a,
                               rtol=1e-4, atol=1e-7, err_msg=f"step {t}, stage {stage}")
    np.testing.assert_allclose(np.asarray(updates["dense1"]["kernel"].b), -lr * g_b,
                               rtol=1e-4, atol=1e-7, err_msg=f"step {t}, stage {stage}")
    # dense2 has no mask: never regularised.
    np.testing.assert_allclose(np.asarray(updates["dense2"]["kernel"].b),
                               -lr * np.asarray(grads["dense2"]["kernel"].b), rtol=1e-6)


def test_only_adapters_train_and_base_has_no_optimizer_state():
  base = make_base(4)
  base_copy = jax.tree_util.tree_map(np.array, base)
  adapters = init_lora(jax.random.key(4), base, rank=RANK, alpha=ALPHA)
  tx = three_stage_lora(optax.adamw(1e-2, weight_decay=0.1), tree_configs(base, CONFIG),
                        total_steps=10)
  state = tx.init(adapters)
  adapter_size = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
  inner_leaves = jax.tree_util.tree_leaves(state.inner_state)
  # adamw: count + mu + nu over the adapters; nothing of the shape or size of a base kernel.
  assert sum(x.size for x in inner_leaves) == 1 + 2 * adapter_size
  base_shapes = {x.shape for x in jax.tree_util.tree_leaves(base)}
  assert not any(x.shape in base_shapes for x in inner_leaves if x.ndim)
  step = make_step(tx)
  start = adapters
  for t in range(10):
    adapters, state, *_ = step(base, adapters, state, batch(t))
  jax.tree_util.tree_map(np.testing.assert_array_equal, base, base_copy)
  assert not np.allclose(np.asarray(adapters["dense1"]["kernel"].b),
                         np.asarray(start["dense1"]["kernel"].b))
  assert int(state.stage) == 3


def test_merge_keeps_vnm_structure_and_equals_masked_sum():
  base = make_base(5)
  adapters = init_lora(jax.random.key(5), base, rank=RANK, alpha=ALPHA)
  tx = three_stage_lora(optax.adam(5e-2), tree_configs(base, CONFIG), total_steps=12,
                        dense_steps=2, dynamic_steps=3)
  state = tx.init(adapters)
  with pytest.raises(ValueError, match="stage 1"):
    merge_lora(base, adapters, state)
  step = make_step(tx)
  for t in range(12):
    adapters, state, *_ = step(base, adapters, state, batch(t))
  merged = merge_lora(base, adapters, state)
  for name in ("dense1", "dense2"):
    mask = np.asarray(state.masks[name]["kernel"])
    kernel = np.asarray(merged[name]["kernel"])
    assert_close(kernel, effective_numpy(base[name]["kernel"], adapters[name]["kernel"], mask),
                 rtol=1e-5)
    assert ref.structure_ok(kernel != 0, CONFIG.v, CONFIG.m)
    assert np.all(kernel[~mask] == 0.0)
    np.testing.assert_array_equal(np.asarray(decompress(compress(kernel, CONFIG, mask=mask))),
                                  kernel)
  np.testing.assert_array_equal(merged["dense1"]["bias"], base["dense1"]["bias"])
  np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])


def test_fixed_mask_lora_from_given_masks_and_nnx_state():
  model = nnx.Sequential(nnx.Linear(24, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
  graphdef, base = nnx.split(model, nnx.Param)
  configs = tree_configs(base, CONFIG)
  masks = jax.tree_util.tree_map(lambda c, w: None if c is None else vnm_mask(w, c), configs,
                                 base, is_leaf=lambda x: x is None)
  adapters = init_lora(jax.random.key(6), base, rank=2, alpha=4.0)
  tx = three_stage_lora(optax.adam(1e-2), configs, total_steps=5, dense_steps=0,
                        dynamic_steps=0, masks=masks)
  state = tx.init(adapters)
  assert int(state.stage) == 3
  x = jax.random.normal(jax.random.key(0), (8, 24))

  @functools.partial(jax.jit, donate_argnums=(1, 2))  # the state owns its buffers
  def step(base, adapters, state):
    grads = jax.grad(lambda ad: jnp.mean(
        nnx.merge(graphdef, lora_params(base, ad, state))(x) ** 2))(adapters)
    updates, state = tx.update(grads, state, adapters, base=base)
    return optax.apply_updates(adapters, updates), state

  for _ in range(3):
    adapters, state = step(base, adapters, state)
  merged = merge_lora(base, adapters, state)
  for layer in (0, 2):
    mask = np.asarray(masks["layers"][layer]["kernel"][...])
    np.testing.assert_array_equal(np.asarray(state.masks["layers"][layer]["kernel"][...]), mask)
    kernel = np.asarray(merged["layers"][layer]["kernel"][...])
    assert np.all(kernel[~mask] == 0.0) and ref.structure_ok(kernel != 0, CONFIG.v, CONFIG.m)
  assert int(state.mask_changes) == 0


def test_default_stage_lengths():
  assert default_stage_steps(1000) == (50, 50)
  assert default_stage_steps(10) == (1, 1)


def test_bad_input_raises_clear_errors():
  base = make_base()
  adapters = init_lora(jax.random.key(0), base, rank=RANK, alpha=ALPHA)
  configs = tree_configs(base, CONFIG)
  tx = three_stage_lora(optax.sgd(1.0), configs, total_steps=10)
  state = tx.init(adapters)
  grads = jax.tree_util.tree_map(jnp.zeros_like, adapters)
  with pytest.raises(ValueError, match="needs the frozen base params"):
    tx.update(grads, state, adapters)
  with pytest.raises(ValueError, match="rank must be an int >= 1"):
    init_lora(jax.random.key(0), base, rank=0)
  with pytest.raises(ValueError, match="alpha must be"):
    init_lora(jax.random.key(0), base, alpha=-1.0)
  with pytest.raises(ValueError, match="'dense1/bias' with shape \\(21,\\)"):
    init_lora(jax.random.key(0), base, filter="dense1")
  with pytest.raises(ValueError, match="selected no leaf"):
    init_lora(jax.random.key(0), base, filter="nothing")
  with pytest.raises(ValueError, match="dense_steps=0 needs masks="):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=10, dense_steps=0, dynamic_steps=2)
  with pytest.raises(ValueError, match="masks= is the starting mask"):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=10, masks=configs)
  with pytest.raises(ValueError, match="exceeds total_steps=10"):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=10, dense_steps=6, dynamic_steps=6)
  with pytest.raises(ValueError, match="both dense_steps and dynamic_steps"):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=10, dense_steps=3)
  masks = jax.tree_util.tree_map(lambda c, w: None if c is None else vnm_mask(w, c), configs,
                                 base, is_leaf=lambda x: x is None)
  masks["dense2"]["kernel"] = None
  with pytest.raises(ValueError, match=r"masks\['dense2'\]\['kernel'\] must be given exactly"):
    three_stage_lora(optax.sgd(1.0), configs, total_steps=10, dense_steps=0, dynamic_steps=0,
                     masks=masks).init(adapters)
  only_first = init_lora(jax.random.key(0), base, filter="dense1/kernel$")
  with pytest.raises(ValueError, match=r"configs\['dense2'\]\['kernel'\] = 8:2:6 but adapters"):
    tx.init(only_first)
  wrong = {**adapters, "dense2": {"kernel": LoRAAdapter(jnp.zeros((5, 4)), jnp.zeros((4, 16)),
                                                        2.0)}}
  with pytest.raises(ValueError, match=r"adapters\['dense2'\]\['kernel'\] has a \(5, 4\)"):
    lora_params(base, wrong)
