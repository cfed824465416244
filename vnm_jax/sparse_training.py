"""Sparse training as optax transformations: fixed-mask fine-tuning and SR-STE.

Both transformations wrap any inner optax optimizer and keep the V:N:M masks in
their own state (a field named ``masks``), so the masks are checkpointed with the
optimizer state and nothing has to be called by hand after an update.

Masks and per-leaf sparsity are described by trees with the params' structure:
a ``masks`` tree holds a bool array of the leaf's shape (True = kept) at every
sparse leaf and None at dense leaves; a ``configs`` tree holds a
:class:`~vnm_jax.config.VNMConfig` at every sparse leaf and None at dense leaves
(build it with ``vnm_jax.trees``, or with ``jax.tree_util.tree_map_with_path``).
Sparse leaves are Flax kernels (in_features, out_features); see
:mod:`vnm_jax.masks` for the axis convention. Linen param dicts and
``nnx.State`` work alike.

Fixed mask (mask computed once, e.g. after one-shot pruning with permutation)::

    masks = vnm_jax.trees.tree_masks(params, "64:2:8")   # or with scores/permutations
    tx = fixed_mask(optax.adamw(1e-4, weight_decay=0.05), masks)
    opt_state = tx.init(params)
    params = sparse_params(params, opt_state)   # prune once; every update keeps it pruned

    @jax.jit
    def train_step(params, opt_state, batch):
      loss_value, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss_value

After every update the pruned entries of ``params`` are exactly zero, whatever
the inner optimizer does (Adam moments, decoupled weight decay, ...).

SR-STE (dynamic mask, dense weights kept)::

    configs = vnm_jax.trees.tree_configs(params, "64:2:8")
    tx = sr_ste(optax.adamw(5e-4, weight_decay=0.05), configs, update_every=1)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
      def loss_fn(params):
        return loss(model.apply(sparse_params(params, opt_state), batch))  # W * mask
      loss_value, grads = jax.value_and_grad(loss_fn)(params)   # straight-through to W
      updates, opt_state = tx.update(grads, opt_state, params)  # + decay term, new mask
      return optax.apply_updates(params, updates), opt_state, loss_value

    pruned = sparse_params(params, opt_state)   # at the end: the V:N:M model

The recomputed masks rank entries by ``score`` (as :func:`vnm_jax.tree_masks` does):
``sr_ste(inner, configs, score="wanda", input_norms=norms, permutations=perms)`` keeps
activation-aware masks formed on permuted channels at every recompute, with the dense
weights in their own coordinates (``norms`` from :func:`vnm_jax.collect_input_norms`,
``perms`` e.g. from :func:`vnm_jax.tree_permutations`; both keyed by path).

``opt_state.mask_changes`` and ``opt_state.flip_rate`` are for logging. To switch
optimizers between stages, carry the masks over:
``fixed_mask(new_inner, sparse_masks(old_state))``.

With ``nnx.Optimizer(model, fixed_mask(...), wrt=nnx.Param)`` the masks live in the
optimizer's state; ``sparse_params(nnx.state(model, nnx.Param), optimizer.opt_state)``
accepts its OptVariable-wrapped state.

Under a ``jax.sharding.Mesh`` (Auto axes) nothing changes: call ``init`` on the
sharded params outside jit (or jit it with ``out_shardings``) so the masks take
their kernels' shardings; the mask computation inside the jitted update is then
partitioned like the kernels (no communication when every shard holds whole
V x M blocks). See tests/test_sharding.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vnm_jax._mask_state import (check_scoring_shapes, check_update_every, compute_masks,
                                  find_state, mask_scoring, refresh_masks)
from vnm_jax._tree_util import check_configs, check_masks
from vnm_jax.masks import check_rule
from vnm_jax.scores import Importance, ScoreFn

PyTree = Any

NO_PARAMS_MSG = ("{name}.update needs the current params: call "
                 "update(grads, opt_state, params).")

SR_STE_DECAY = 2e-4


class FixedMaskState(NamedTuple):
  """State of :func:`fixed_mask`.

  Attributes:
    masks: the params' structure; a bool array of the leaf's shape (True = kept)
      at every sparse leaf, None at dense leaves.
    inner_state: the wrapped optimizer's state.
  """

  masks: PyTree
  inner_state: optax.OptState


class SRSTEState(NamedTuple):
  """State of :func:`sr_ste`.

  Attributes:
    step: int32 scalar, updates applied so far.
    masks: the params' structure; the bool mask (True = kept) the next forward
      uses at every sparse leaf, None at dense leaves.
    mask_changes: int32 scalar, how many recomputations changed at least one entry.
    flip_rate: float32 scalar, the fraction of sparse entries whose mask bit
      changed at the most recent recomputation.
    inner_state: the wrapped optimizer's state.
  """

  step: jax.Array
  masks: PyTree
  mask_changes: jax.Array
  flip_rate: jax.Array
  inner_state: optax.OptState


def sparse_masks(opt_state: PyTree) -> PyTree:
  """The masks tree (params' structure, None where dense) of a fixed-mask or SR-STE state.

  ``opt_state`` may be the state of a chain or wrapper that contains exactly one
  :class:`FixedMaskState` or :class:`SRSTEState`.
  """
  return find_state(opt_state, (FixedMaskState, SRSTEState), "sparse_masks").masks


def sparse_params(params: PyTree, opt_state: PyTree) -> PyTree:
  """The params the forward pass uses: ``W * mask`` at sparse leaves, W elsewhere.

  The gradient is straight-through: d loss / d W equals d loss / d (W * mask) at
  every entry, pruned ones included, which SR-STE needs (the fixed-mask
  transformation discards the gradient of pruned entries anyway). Pruned entries
  are exactly 0 in the result. Use it inside the loss for SR-STE, and outside
  ``grad`` to get the pruned model.

  Args:
    params: the dense params (any structure: linen dict, nnx.State, ...).
    opt_state: a state containing one :class:`FixedMaskState` or :class:`SRSTEState`.
  """
  masks = check_masks(sparse_masks(opt_state), params)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  forward = [w if m is None else w + jax.lax.stop_gradient(jnp.where(m, w, 0) - w)
             for w, m in zip(leaves, masks)]
  return treedef.unflatten(forward)


def fixed_mask(inner: optax.GradientTransformation,
               masks: PyTree | Callable[[PyTree], PyTree]) -> optax.GradientTransformationExtraArgs:
  """Trains with a fixed V:N:M mask: pruned entries stay exactly zero after every step.

  The gradient of pruned entries is zeroed before ``inner`` (so moments and norms
  see only the kept weights), and after ``inner`` the update is rewritten so that
  ``params + update`` is exactly 0 at every pruned entry (kept entries get
  ``inner``'s update unchanged). Weight decay or momentum inside ``inner`` cannot
  revive a pruned weight, and params that were not yet pruned are pruned by the
  first update. Use it as the outermost transformation (after everything that
  changes the update), and apply the updates with ``optax.apply_updates``.

  Args:
    inner: any optax optimizer, e.g. ``optax.adamw(1e-4, weight_decay=0.05)``.
    masks: the masks tree (params' structure; bool arrays, True = kept, at sparse
      leaves; None at dense ones), or a function ``params -> masks`` called by
      ``init`` (e.g. ``lambda p: vnm_jax.trees.tree_masks(p, config)``). The masks
      are copied into the state (:class:`FixedMaskState`), so they are saved with
      it and :func:`sparse_masks` recovers them for the next optimizer.

  Returns:
    A GradientTransformationExtraArgs; ``update`` requires ``params``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    tree = masks(params) if callable(masks) else masks
    entries = check_masks(tree, params)
    # Own copies: a train step that donates the state must not delete the caller's masks.
    entries = [None if m is None else jnp.copy(m) for m in entries]
    return FixedMaskState(masks=jax.tree_util.tree_structure(params).unflatten(entries),
                          inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format(name="fixed_mask"))
    mask_leaves = check_masks(state.masks, params)
    param_leaves, treedef = jax.tree_util.tree_flatten(params)
    grads = treedef.unflatten([
        g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype))
        for g, m in zip(treedef.flatten_up_to(updates), mask_leaves)])
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    constrained = [u if m is None else jnp.where(m, u, -p.astype(u.dtype))
                   for u, m, p in zip(treedef.flatten_up_to(updates), mask_leaves, param_leaves)]
    return treedef.unflatten(constrained), FixedMaskState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sr_ste(inner: optax.GradientTransformation, configs: PyTree, *,
           decay: float = SR_STE_DECAY, update_every: int = 1, rule: str = "column_l1",
           score: Importance | str | ScoreFn = Importance.MAGNITUDE,
           input_norms: PyTree | None = None,
           permutations: PyTree | None = None) -> optax.GradientTransformationExtraArgs:
  """SR-STE dynamic sparse training (sparse-refined straight-through estimator).

  The dense weights W are trained. The forward uses ``W * mask`` through
  :func:`sparse_params` (straight-through gradient). Each update adds the
  sparse-refined term ``decay * (1 - mask) * W`` to the gradient of every sparse
  leaf (``mask`` is the one the forward used), runs ``inner``, and every
  ``update_every`` steps recomputes the masks from the updated weights
  ``|W + update|`` with :func:`~vnm_jax.masks.vnm_mask`, inside the jitted update.
  Use it as the outermost transformation.

  Args:
    inner: any optax optimizer.
    configs: the params' structure with a VNMConfig at every sparse 2D kernel and
      None elsewhere.
    decay: lambda of the sparse-refined term (2e-4 in SR-STE), >= 0.
    update_every: k, recompute the masks after every k-th update (1 = every step).
    rule: the mask rule, "column_l1" or "exhaustive" (see ``vnm_mask``).
    score: what the masks rank entries by: "magnitude" (|W|, the default), "wanda"
      (|W| * input norm), "ria", an :class:`~vnm_jax.scores.Importance`, or a callable
      ``(kernel (K, N), norms (K,) | None) -> scores (K, N)``.
    input_norms: ``{path: (K,) input L2 norms}`` (or a tree of the params' structure),
      one per sparse leaf; required by "wanda" and "ria". Constants of the transform.
    permutations: ``{path: Permutation}`` (or a tree) for sparse leaves whose V:N:M
      groups are formed on permuted channels (``vnm_mask(..., permutation=p)``); the
      weights stay in their own order.

  Raises:
    ValueError/TypeError at construction for a bad ``score``, missing norms, or per-path
    entries that name no sparse leaf; at ``init`` for norms or permutations that do not
    fit their kernel.

  Returns:
    A GradientTransformationExtraArgs with state :class:`SRSTEState`; ``init``
    computes the first masks from the initial params; ``update`` requires ``params``.
  """
  inner = optax.with_extra_args_support(inner)
  check_update_every(update_every)
  check_rule(rule)
  if not decay >= 0:
    raise ValueError(f"decay must be >= 0 (lambda of the SR-STE term), got {decay!r}.")
  scoring = mask_scoring(configs, score, input_norms, permutations, "sr_ste")

  def init_fn(params):
    config_leaves = check_configs(configs, params)
    leaves = jax.tree_util.tree_leaves(params)
    check_scoring_shapes(scoring, [jnp.shape(w) for w in leaves], "sr_ste")
    masks = compute_masks(leaves, config_leaves, rule, scoring)
    return SRSTEState(step=jnp.zeros((), jnp.int32),
                      masks=jax.tree_util.tree_structure(params).unflatten(masks),
                      mask_changes=jnp.zeros((), jnp.int32), flip_rate=jnp.zeros((), jnp.float32),
                      inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format(name="sr_ste"))
    config_leaves = check_configs(configs, params)
    mask_leaves = check_masks(state.masks, params)
    param_leaves, treedef = jax.tree_util.tree_flatten(params)
    grads = treedef.unflatten([
        g if m is None else g + (decay * jnp.where(m, 0, w)).astype(g.dtype)
        for g, m, w in zip(treedef.flatten_up_to(updates), mask_leaves, param_leaves)])
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    step = state.step + 1

    masks, mask_changes, flip_rate = refresh_masks(
        True if update_every == 1 else step % update_every == 0,
        lambda: jax.tree_util.tree_leaves(optax.apply_updates(params, updates)),
        config_leaves, rule, mask_leaves, state.mask_changes, state.flip_rate, scoring)
    return updates, SRSTEState(step=step, masks=treedef.unflatten(masks),
                               mask_changes=mask_changes, flip_rate=flip_rate,
                               inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
