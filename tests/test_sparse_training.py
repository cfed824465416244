"""Fixed-mask and SR-STE optax transformations against hand-computed references."""

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
from vnm_jax.masks import is_vnm, vnm_mask
from vnm_jax.permutation import Permutation, permute, unpermute
from vnm_jax.sparse_training import (FixedMaskState, SRSTEState, fixed_mask, sparse_masks,
                                     sparse_params, sr_ste)
from vnm_jax.trees import tree_masks

CONFIG = VNMConfig(8, 2, 6)  # 37 and 21 divide by neither M nor V: padding is exercised


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense1": {"kernel": jnp.asarray(rng.standard_normal((37, 21)), jnp.float32),
                 "bias": jnp.asarray(rng.standard_normal(21), jnp.float32)},
      "dense2": {"kernel": jnp.asarray(rng.standard_normal((21, 5)), jnp.float32)},
  }


def configs_for(params):
  """VNMConfig at the first kernel only: the second kernel and the bias stay dense."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: CONFIG if jax.tree_util.keystr(path) == "['dense1']['kernel']" else None,
      params)


def masks_for(params):
  return jax.tree_util.tree_map(lambda c, w: None if c is None else vnm_mask(w, c),
                                configs_for(params), params, is_leaf=lambda x: x is None)


def loss_fn(params, x):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"]) ** 2)


def batch(step):
  return jax.random.normal(jax.random.fold_in(jax.random.key(7), step), (16, 37))


def test_fixed_mask_keeps_pruned_entries_zero_under_adamw():
  params = make_params()  # not pre-pruned: the first update must prune
  masks = masks_for(params)
  mask = np.asarray(masks["dense1"]["kernel"])
  inner = optax.adamw(3e-2, weight_decay=0.1)
  tx = fixed_mask(inner, masks)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(loss_fn)(sparse_params(params, state), x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def reference_step(ref_params, ref_state, x):
    # adamw on masked gradients, then multiply by the mask.
    ref_forward = {**ref_params, "dense1": {**ref_params["dense1"],
                                            "kernel": ref_params["dense1"]["kernel"] * mask}}
    grads = jax.grad(loss_fn)(ref_forward, x)
    grads["dense1"]["kernel"] = grads["dense1"]["kernel"] * mask
    ref_updates, ref_state = inner.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    ref_params["dense1"]["kernel"] = ref_params["dense1"]["kernel"] * mask
    return ref_params, ref_state

  ref_params, ref_state = params, inner.init(params)
  for t in range(60):
    params, state = step(params, state, batch(t))
    kernel = np.asarray(params["dense1"]["kernel"])
    assert np.all(kernel[~mask] == 0.0), f"pruned entries revived at step {t}"
    ref_params, ref_state = reference_step(ref_params, ref_state, batch(t))
  assert np.all(kernel[mask] != 0.0)
  jax.tree_util.tree_map(
      lambda a, b: assert_close(a, b, rtol=1e-5),
      params, ref_params)
  # The moments of pruned entries are never fed a gradient.
  mu = np.asarray(state.inner_state[0].mu["dense1"]["kernel"])
  assert np.all(mu[~mask] == 0.0)


def test_fixed_mask_holds_for_any_inner_update():
  """An inner transform that pushes every entry still cannot revive pruned weights."""
  params = make_params(1)
  masks = masks_for(params)
  push_everything = optax.chain(optax.sgd(0.1), optax.add_decayed_weights(-0.5))
  tx = fixed_mask(push_everything, masks_for)  # masks from a function of the params
  state = tx.init(params)
  np.testing.assert_array_equal(state.masks["dense1"]["kernel"], masks["dense1"]["kernel"])
  assert state.masks["dense2"]["kernel"] is None
  for t in range(5):
    grads = jax.grad(loss_fn)(params, batch(t))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  kernel, mask = np.asarray(params["dense1"]["kernel"]), np.asarray(masks["dense1"]["kernel"])
  assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0)
  assert np.all(np.asarray(params["dense2"]["kernel"]) != 0.0)  # dense leaves untouched


def test_masks_survive_a_change_of_optimizer():
  params = make_params(2)
  stage1 = fixed_mask(optax.adam(1e-2), masks_for)
  state = stage1.init(params)
  grads = jax.grad(loss_fn)(params, batch(0))
  updates, state = stage1.update(grads, state, params)
  params = optax.apply_updates(params, updates)

  # Stage 2 with another optimizer inside a chain: the masks are carried over.
  stage2 = optax.chain(optax.clip_by_global_norm(1.0),
                       fixed_mask(optax.sgd(0.5, momentum=0.9), sparse_masks(state)))
  state2 = stage2.init(params)
  np.testing.assert_array_equal(sparse_masks(state2)["dense1"]["kernel"],
                                sparse_masks(state)["dense1"]["kernel"])
  for t in range(1, 4):
    grads = jax.grad(loss_fn)(sparse_params(params, state2), batch(t))
    updates, state2 = stage2.update(grads, state2, params)
    params = optax.apply_updates(params, updates)
  mask = np.asarray(sparse_masks(state2)["dense1"]["kernel"])
  assert np.all(np.asarray(params["dense1"]["kernel"])[~mask] == 0.0)


def test_sparse_params_is_straight_through():
  params = make_params(3)
  state = fixed_mask(optax.sgd(1.0), masks_for).init(params)
  mask = np.asarray(state.masks["dense1"]["kernel"])
  forward = sparse_params(params, state)
  kernel = np.asarray(params["dense1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(forward["dense1"]["kernel"]), kernel * mask)
  np.testing.assert_array_equal(np.asarray(forward["dense2"]["kernel"]),
                                np.asarray(params["dense2"]["kernel"]))
  # d loss / d W equals the gradient at the pruned weights, on every entry (not masked).
  straight = jax.grad(lambda p: loss_fn(sparse_params(p, state), batch(0)))(params)
  at_pruned = jax.grad(loss_fn)(forward, batch(0))
  np.testing.assert_array_equal(np.asarray(straight["dense1"]["kernel"]),
                                np.asarray(at_pruned["dense1"]["kernel"]))
  assert np.any(np.asarray(straight["dense1"]["kernel"])[~mask] != 0.0)


def test_sr_ste_matches_hand_computed_sgd_step():
  lr, decay = 0.05, 1e-2
  params = make_params(4)
  tx = sr_ste(optax.sgd(lr), configs_for(params), decay=decay)
  state = tx.init(params)
  kernel = np.asarray(params["dense1"]["kernel"], np.float64)
  mask = ref.column_l1_mask(np.abs(kernel), CONFIG.v, CONFIG.m)
  np.testing.assert_array_equal(np.asarray(state.masks["dense1"]["kernel"]), mask)

  grads = jax.grad(lambda p: loss_fn(sparse_params(p, state), batch(0)))(params)
  updates, new_state = tx.update(grads, state, params)
  g = np.asarray(grads["dense1"]["kernel"], np.float64)
  expected = -lr * (g + decay * (1 - mask) * kernel)
  assert_close(updates["dense1"]["kernel"], expected, rtol=1e-5)
  # Dense leaves get the plain SGD update (no decay term).
  np.testing.assert_allclose(np.asarray(updates["dense2"]["kernel"]),
                             -lr * np.asarray(grads["dense2"]["kernel"]), rtol=1e-6)
  # The next mask is the V:N:M mask of the updated weights.
  new_kernel = np.asarray(optax.apply_updates(params, updates)["dense1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(new_state.masks["dense1"]["kernel"]),
                                ref.column_l1_mask(np.abs(new_kernel), CONFIG.v, CONFIG.m))
  assert int(new_state.step) == 1


def test_sr_ste_masks_change_and_decay_shrinks_pruned_weights():
  params = make_params(5)
  configs = configs_for(params)

  def run(decay, update_every, steps=40):
    tx = sr_ste(optax.adam(2e-2), configs, decay=decay, update_every=update_every)
    state = tx.init(params)

    @jax.jit
    def step(p, state, x):
      grads = jax.grad(lambda p: loss_fn(sparse_params(p, state), x))(p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    p, history = params, []
    for t in range(steps):
      p, state = step(p, state, batch(t))
      history.append((int(state.step), np.asarray(state.masks["dense1"]["kernel"]),
                      int(state.mask_changes), float(state.flip_rate)))
    return p, state, history

  p, state, history = run(decay=2e-4, update_every=1)
  initial = np.asarray(vnm_mask(params["dense1"]["kernel"], CONFIG))
  assert int(state.mask_changes) > 0
  assert np.any(history[-1][1] != initial)
  assert all(0.0 <= h[3] <= 1.0 for h in history)

  # Every k steps: the mask only moves at multiples of k, to the mask of the weights then.
  p3, state3, history3 = run(decay=2e-4, update_every=3, steps=9)
  for (step, mask, _, _), (_, previous, _, _) in zip(history3[1:], history3[:-1]):
    if step % 3:
      np.testing.assert_array_equal(mask, previous)
  np.testing.assert_array_equal(
      history3[-1][1], np.asarray(vnm_mask(p3["dense1"]["kernel"], CONFIG)))

  # A large decay pulls the pruned weights towards zero (the term is really applied).
  p_strong, state_strong, _ = run(decay=0.5, update_every=1)
  p_none, state_none, _ = run(decay=0.0, update_every=1)

  def pruned_norm(p, s):
    m = np.asarray(s.masks["dense1"]["kernel"])
    return np.linalg.norm(np.asarray(p["dense1"]["kernel"])[~m])

  assert pruned_norm(p_strong, state_strong) < 0.5 * pruned_norm(p_none, state_none)


def wanda_inputs(seed):
  """Input norms and a permutation for dense1/kernel (37, 21)."""
  rng = np.random.default_rng(seed)
  norms = {"dense1/kernel": jnp.asarray(rng.uniform(0.05, 4.0, 37), jnp.float32)}
  permutations = {"dense1/kernel": Permutation(rng.permutation(37), rng.permutation(21))}
  return norms, permutations


@pytest.mark.parametrize("score", ["wanda", "ria"])
def test_sr_ste_activation_aware_masks_equal_tree_masks(score):
  params = make_params(3)
  norms, permutations = wanda_inputs(4)
  tx = sr_ste(optax.adam(5e-2), configs_for(params), score=score, input_norms=norms,
              permutations=permutations)

  def expected(p):
    return np.asarray(tree_masks(p, CONFIG, filter="dense1/kernel$", score=score,
                                 input_norms=norms, permutations=permutations)["dense1"]["kernel"])

  @jax.jit
  def step(p, state, x):
    grads = jax.grad(lambda p: loss_fn(sparse_params(p, state), x))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  p, state = params, tx.init(params)
  for t in range(5):
    mask = np.asarray(state.masks["dense1"]["kernel"])
    # The mask the next forward uses is the one of the current (updated) weights.
    np.testing.assert_array_equal(mask, expected(p), err_msg=f"after {t} updates")
    assert is_vnm(mask, CONFIG, permutation=permutations["dense1/kernel"]), t
    assert state.masks["dense2"]["kernel"] is None
    p, state = step(p, state, batch(t))
  assert int(state.mask_changes) > 0
  # The score matters: the magnitude mask of the same weights is another mask.
  kernel = np.asarray(p["dense1"]["kernel"], np.float64)
  assert not np.array_equal(expected(p), np.asarray(vnm_mask(kernel, CONFIG)))
  if score == "wanda":  # independent check: numpy rule on the permuted |W| * n
    perm = permutations["dense1/kernel"]
    scores = np.abs(kernel) * np.asarray(norms["dense1/kernel"], np.float64)[:, None]
    reference = ref.column_l1_mask(np.asarray(permute(scores, perm)), CONFIG.v, CONFIG.m)
    np.testing.assert_array_equal(np.asarray(unpermute(reference, perm)), expected(p))


def test_sr_ste_score_arguments_are_validated():
  params = make_params()
  configs = configs_for(params)
  norms, permutations = wanda_inputs(0)
  with pytest.raises(ValueError, match="score='wanda' needs input_norms .*'dense1/kernel'"):
    sr_ste(optax.sgd(1.0), configs, score="wanda")
  with pytest.raises(ValueError, match="score='magnitude' does not use them"):
    sr_ste(optax.sgd(1.0), configs, input_norms=norms)
  with pytest.raises(ValueError, match="input_norms has entries for 'dense3/kernel', which name"):
    sr_ste(optax.sgd(1.0), configs, score="wanda",
           input_norms={**norms, "dense3/kernel": jnp.ones(21)})
  # Norms of a dense leaf (collect_input_norms records every Linear) are ignored.
  sr_ste(optax.sgd(1.0), configs, score="wanda",
         input_norms={**norms, "dense2/kernel": jnp.ones(21)}).init(params)
  with pytest.raises(ValueError, match="finite and >= 0"):
    sr_ste(optax.sgd(1.0), configs, score="ria", input_norms={"dense1/kernel": -jnp.ones(37)})
  with pytest.raises(ValueError, match="score must be one of"):
    sr_ste(optax.sgd(1.0), configs, score="hessian")
  with pytest.raises(TypeError, match=r"permutations\['dense1/kernel'\] must be a"):
    sr_ste(optax.sgd(1.0), configs, permutations={"dense1/kernel": np.arange(37)})
  with pytest.raises(ValueError, match=r"input_norms\['dense1/kernel'\] has shape \(36,\)"):
    sr_ste(optax.sgd(1.0), configs, score="wanda",
           input_norms={"dense1/kernel": jnp.ones(36)}).init(params)
  bad = {"dense1/kernel": Permutation(np.arange(21), None)}
  with pytest.raises(ValueError, match=r"permutations\['dense1/kernel'\].*shape \(37,\)"):
    sr_ste(optax.sgd(1.0), configs, permutations=bad).init(params)
  # Magnitude with a permutation needs no norms.
  state = sr_ste(optax.sgd(1.0), configs, permutations=permutations).init(params)
  np.testing.assert_array_equal(
      np.asarray(state.masks["dense1"]["kernel"]),
      np.asarray(vnm_mask(params["dense1"]["kernel"], CONFIG,
                          permutation=permutations["dense1/kernel"])))


def test_transforms_work_on_nnx_state():
  model = nnx.Sequential(nnx.Linear(24, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
  graphdef, params = nnx.split(model, nnx.Param)
  configs = jax.tree_util.tree_map_with_path(
      lambda path, leaf: CONFIG if leaf.ndim == 2 else None, params)
  x = jax.random.normal(jax.random.key(0), (8, 24))

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

  for tx in (sr_ste(optax.adamw(1e-2), configs),
             fixed_mask(optax.adamw(1e-2, weight_decay=0.1),
                        lambda p: jax.tree_util.tree_map(
                            lambda c, w: None if c is None else vnm_mask(w, c), configs, p,
                            is_leaf=lambda x: x is None))):
    state = tx.init(params)
    assert isinstance(state, (SRSTEState, FixedMaskState))

    @functools.partial(jax.jit, donate_argnums=(1,))  # the state owns its buffers
    def step(p, state):
      grads = jax.grad(lambda p: loss(sparse_params(p, state)))(p)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state

    p = params
    for _ in range(3):
      p, state = step(p, state)
    forward = sparse_params(p, state)
    for layer in (0, 2):
      kernel = np.asarray(forward["layers"][layer]["kernel"][...])
      assert (kernel != 0).sum() <= kernel.size * CONFIG.density + CONFIG.v * 4


def test_nnx_optimizer_keeps_the_masks_in_its_state():
  model = nnx.Sequential(nnx.Linear(24, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
  masks = tree_masks(nnx.state(model, nnx.Param), CONFIG)
  optimizer = nnx.Optimizer(model, fixed_mask(optax.adamw(1e-2, weight_decay=0.1), masks),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (8, 24))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(model, optimizer)
  for layer in (0, 2):
    mask = np.asarray(masks["layers"][layer]["kernel"][...])
    kernel = np.asarray(model.layers[layer].kernel[...])
    assert np.all(kernel[~mask] == 0.0) and np.all(kernel[mask] != 0.0)
  # The optimizer's state holds OptVariables where the params hold Params: still accepted.
  forward = sparse_params(nnx.state(model, nnx.Param), optimizer.opt_state)
  np.testing.assert_array_equal(np.asarray(forward["layers"][0]["kernel"][...]),
                                np.asarray(model.layers[0].kernel[...]))


def test_bad_input_raises_clear_errors():
  params = make_params()
  masks = masks_for(params)
  tx = fixed_mask(optax.sgd(1.0), masks)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, state)
  bad_shape = {**masks, "dense1": {"kernel": jnp.ones((21, 37), bool), "bias": None}}
  with pytest.raises(ValueError, match=r"\['dense1'\]\['kernel'\] has shape \(21, 37\)"):
    fixed_mask(optax.sgd(1.0), bad_shape).init(params)
  not_bool = {**masks, "dense1": {"kernel": jnp.ones((37, 21)), "bias": None}}
  with pytest.raises(TypeError, match="must be a bool array"):
    fixed_mask(optax.sgd(1.0), not_bool).init(params)
  with pytest.raises(ValueError, match="params' structure"):
    fixed_mask(optax.sgd(1.0), {"dense1": None}).init(params)
  configs = configs_for(params)
  configs["dense1"]["bias"] = CONFIG
  with pytest.raises(ValueError, match=r"\['dense1'\]\['bias'\] = 8:2:6 .* 2D kernels"):
    sr_ste(optax.sgd(1.0), configs).init(params)
  configs["dense1"]["bias"] = "8:2:6"
  with pytest.raises(TypeError, match="must be a VNMConfig or None"):
    sr_ste(optax.sgd(1.0), configs).init(params)
  with pytest.raises(ValueError, match="update_every must be an int >= 1"):
    sr_ste(optax.sgd(1.0), configs_for(params), update_every=0)
  with pytest.raises(ValueError, match="decay must be >= 0"):
    sr_ste(optax.sgd(1.0), configs_for(params), decay=-1.0)
  with pytest.raises(ValueError, match="rule must be one of"):
    sr_ste(optax.sgd(1.0), configs_for(params), rule="magnitude")
  with pytest.raises(ValueError, match="exactly one FixedMaskState or SRSTEState"):
    sparse_params(params, optax.sgd(1.0).init(params))
