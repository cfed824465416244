"""LoRA over Flax param trees, three-stage sparse LoRA, and a merge that keeps V:N:M.

Shapes follow the Flax kernel convention (in_features, out_features) = (K, N): an
adapter holds ``a`` (K, r) (the input-side projection, random init) and ``b``
(r, N) (output side, zero init), and the effective kernel is

    (W + scale * a @ b) * mask,    scale = alpha / rank,

which is the paper's ``(W + s*B*A) * M`` written for (in, out) kernels. The base W
is frozen: it is never given to the optimizer (no optimizer state) and gradients
are taken with respect to the adapters only.

The three stages (one :func:`three_stage_lora` transformation, usable inside a
single jitted train step; the stage is a value in the state, not a Python branch):

1. dense LoRA: mask all ones, for ``dense_steps`` updates;
2. sparse LoRA with a dynamic mask, for ``dynamic_steps`` updates: the mask is
   recomputed every ``update_every`` steps from W + scale * a @ b (ranked by
   ``score``: |.| by default, or Wanda / RIA with the kernels' input norms, and
   formed on each kernel's channel permutation where one is given), and the
   adapters' gradient gets the chain-rule gradient of
   ``regularization / 2 * ||(W + scale * a @ b) * (1 - M_prev)||^2``, i.e. the
   term ``regularization * (W + s*a@b) * (1 - M_prev)`` added to the gradient of
   the effective kernel;
3. sparse LoRA with the mask fixed (recomputed once more on entering stage 3).

Intended use (linen dict or ``nnx.State`` alike)::

    base = params                                   # frozen
    adapters = init_lora(jax.random.key(0), base, rank=8, alpha=16.0)
    configs = vnm_jax.trees.tree_configs(base, "64:2:8")
    tx = three_stage_lora(optax.adamw(2e-4), configs, total_steps=10_000)
    opt_state = tx.init(adapters)

    @jax.jit
    def train_step(base, adapters, opt_state, batch):  # base as an argument, not a constant
      def loss_fn(adapters):
        return loss(model.apply(lora_params(base, adapters, opt_state), batch))
      loss_value, grads = jax.value_and_grad(loss_fn)(adapters)
      updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
      return optax.apply_updates(adapters, updates), opt_state, loss_value

    # opt_state.stage, opt_state.mask_changes, opt_state.flip_rate are for logging.
    merged = merge_lora(base, adapters, opt_state)  # (W + s*a@b) * mask: V:N:M, compresses

With nnx: ``graphdef, base = nnx.split(model, nnx.Param)`` and the forward is
``nnx.merge(graphdef, lora_params(base, adapters, opt_state))(x)``.

Activation-aware masks without reparametrising the model:
``three_stage_lora(..., score="wanda", input_norms=norms, permutations=perms)`` (norms
from :func:`vnm_jax.collect_input_norms`, permutations e.g. from
:func:`vnm_jax.tree_permutations`, both keyed by path): every recomputed mask equals
``vnm_jax.tree_masks(W + s*a@b, ..., score="wanda", input_norms=norms,
permutations=perms)``, and the base stays in its own channel order.

A fixed-mask LoRA run (e.g. from a Wanda or permuted one-shot mask) is
``three_stage_lora(..., dense_steps=0, dynamic_steps=0, masks=masks)``.

Under a ``jax.sharding.Mesh`` (Auto axes): the stage-1 masks that ``init`` makes
are plain all-ones arrays; place the state like the base (each mask like its
kernel), e.g. ``jax.device_put(opt_state, shardings)``, so that the jitted step
keeps them sharded (see tests/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vnm_jax._mask_state import (check_scoring_shapes, check_update_every, find_state,
                                  mask_scoring, refresh_masks)
from vnm_jax._tree_util import check_configs, check_masks, flatten_like, is_none, leaf_paths
from vnm_jax.masks import check_rule
from vnm_jax.scores import Importance, ScoreFn
from vnm_jax.trees import PathFilter, path_predicate, path_str

PyTree = Any

# Stages 1 + 2 take this share of the total steps by default, split evenly.
DEFAULT_SPARSE_SEARCH_SHARE = 0.1
DEFAULT_REGULARIZATION = 2e-4

DENSE_STAGE, DYNAMIC_STAGE, FIXED_STAGE = 1, 2, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
  """A low-rank update ``scale * a @ b`` of one (K, N) kernel.

  A pytree: ``a`` and ``b`` are children (trainable), ``scale`` is static.

  Attributes:
    a: (K, r), input side; random at init.
    b: (r, N), output side; zero at init, so the adapted model starts as the base.
    scale: alpha / rank.
  """

  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True))

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def delta(self) -> jax.Array:
    """``scale * a @ b``, (K, N), accumulated in float32."""
    return self.scale * jnp.matmul(self.a, self.b, preferred_element_type=jnp.float32)


def _is_adapter(x) -> bool:
  return x is None or isinstance(x, LoRAAdapter)


def init_lora(key: jax.Array, params: PyTree, *, rank: int = 8, alpha: float = 16.0,
              filter: PathFilter | None = None, dtype=None) -> PyTree:
  """Adapters for the kernels of ``params`` that ``filter`` selects.

  Args:
    key: PRNG key; each adapter's ``a`` uses ``fold_in(key, leaf index)``.
    params: the base params (linen dict or ``nnx.State``).
    rank: r >= 1.
    alpha: scale = alpha / rank.
    filter: which leaves get an adapter, as in :func:`vnm_jax.trees.tree_configs`:
      None (2D ``kernel`` leaves outside embeddings, norms and heads), a regex
      searched in the "/"-joined path, or a predicate ``(path, leaf) -> bool``.
      Selected leaves must be 2D (in_features, out_features).
    dtype: the adapters' dtype; default the kernel's.

  Returns:
    The params' structure with a :class:`LoRAAdapter` at every selected leaf and
    None elsewhere. ``a`` is uniform in +-1/sqrt(K) (PEFT's default), ``b`` is 0.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be an int >= 1, got {rank!r}.")
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a finite number > 0 (scale = alpha / rank), got {alpha!r}.")
  predicate = path_predicate(filter)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  adapters = []
  for index, (key_path, leaf) in enumerate(leaves):
    path = path_str(key_path)
    if not predicate(path, leaf):
      adapters.append(None)
      continue
    if jnp.ndim(leaf) != 2:
      raise ValueError(f"filter selected {path!r} with shape {jnp.shape(leaf)}: LoRA adapters "
                       f"need a 2D kernel (in_features, out_features); narrow the filter.")
    k, n = leaf.shape
    leaf_dtype = leaf.dtype if dtype is None else jnp.dtype(dtype)
    bound = 1.0 / math.sqrt(k)
    a = jax.random.uniform(jax.random.fold_in(key, index), (k, rank), leaf_dtype, -bound, bound)
    adapters.append(LoRAAdapter(a=a, b=jnp.zeros((rank, n), leaf_dtype), scale=alpha / rank))
  if all(a is None for a in adapters):
    raise ValueError(f"filter={filter!r} selected no leaf of params; its paths are "
                     f"{[path_str(p) for p, _ in leaves][:6]}...")
  return treedef.unflatten(adapters)


def _check_adapters(adapters: PyTree, base: PyTree) -> list:
  """Flattened per-leaf LoRAAdapter | None, validated against the base params."""
  entries = flatten_like(base, adapters, "adapters")
  for path, adapter, w in zip(leaf_paths(base), entries, jax.tree_util.tree_leaves(base)):
    if adapter is None:
      continue
    if not isinstance(adapter, LoRAAdapter):
      raise TypeError(f"adapters{path} must be a LoRAAdapter or None, got "
                      f"{type(adapter).__name__}.")
    shape = jnp.shape(w)
    if (len(shape) != 2 or adapter.a.shape != (shape[0], adapter.rank)
        or adapter.b.shape != (adapter.rank, shape[1])):
      raise ValueError(f"adapters{path} has a {adapter.a.shape} and b {adapter.b.shape}; the "
                       f"base kernel is {shape}, so a must be (K, r) and b (r, N).")
  return entries


def _effective(w: jax.Array, adapter: LoRAAdapter | None, mask: jax.Array | None) -> jax.Array:
  """(W + scale * a @ b) * mask in W's dtype (the sum in float32)."""
  if adapter is not None:
    w = (w.astype(jnp.float32) + adapter.delta()).astype(w.dtype)
  return w if mask is None else jnp.where(mask, w, jnp.zeros((), w.dtype))


class ThreeStageLoRAState(NamedTuple):
  """State of :func:`three_stage_lora`.

  Attributes:
    step: int32 scalar, updates applied so far.
    stage: int32 scalar, the stage (1 dense, 2 dynamic mask, 3 fixed mask) of the
      next update, i.e. the stage the current masks belong to.
    masks: the base params' structure; a bool array (True = kept) at every sparse
      leaf (all True during stage 1), None at dense leaves.
    mask_changes: int32 scalar, how many recomputations changed at least one entry
      (the switch from the all-ones mask counts).
    flip_rate: float32 scalar, the fraction of sparse entries whose mask bit
      changed at the most recent recomputation.
    inner_state: the wrapped optimizer's state (adapters only).
  """

  step: jax.Array
  stage: jax.Array
  masks: PyTree
  mask_changes: jax.Array
  flip_rate: jax.Array
  inner_state: optax.OptState


def default_stage_steps(total_steps: int) -> tuple[int, int]:
  """(dense_steps, dynamic_steps): stages 1 + 2 take 10 % of ``total_steps``
  (at least 2 steps), split evenly; stage 1 gets at least 1 step."""
  search = min(total_steps, max(2, int(DEFAULT_SPARSE_SEARCH_SHARE * total_steps)))
  dense = max(1, search // 2)
  return dense, search - dense


def _check_steps(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
  return value


def three_stage_lora(inner: optax.GradientTransformation, configs: PyTree, *,
                     total_steps: int, dense_steps: int | None = None,
                     dynamic_steps: int | None = None, update_every: int = 1,
                     regularization: float = DEFAULT_REGULARIZATION,
                     rule: str = "column_l1",
                     masks: PyTree | None = None,
                     score: Importance | str | ScoreFn = Importance.MAGNITUDE,
                     input_norms: PyTree | None = None,
                     permutations: PyTree | None = None
                     ) -> optax.GradientTransformationExtraArgs:
  """Three-stage sparse LoRA (dense -> dynamic mask -> fixed mask) as one transformation.

  The params of this transformation are the adapters (from :func:`init_lora`);
  ``update`` also needs the frozen base params as ``base=`` (an extra argument
  that ``optax.chain`` passes through). The forward uses
  :func:`lora_params` ``(base, adapters, opt_state)``. Stage ``s`` of step ``t``
  (0-based): 1 if ``t < dense_steps``, 2 if ``t < dense_steps + dynamic_steps``,
  else 3.

  Args:
    inner: any optax optimizer for the adapters.
    configs: the base params' structure with a VNMConfig at every sparse 2D kernel
      and None elsewhere (e.g. ``vnm_jax.trees.tree_configs(base, "64:2:8")``).
      Every sparse kernel needs an adapter (prune frozen kernels without one up
      front with ``vnm_jax.trees.tree_apply_masks``).
    total_steps: the run's length; sets the default stage lengths.
    dense_steps: stage-1 length; default with ``dynamic_steps`` from
      :func:`default_stage_steps` (stages 1 + 2 = 10 % of ``total_steps``).
    dynamic_steps: stage-2 length.
    update_every: k, recompute the mask every k steps of stage 2.
    regularization: lambda of the stage-2 regulariser on the entries the previous
      mask pruned, >= 0.
    rule: "column_l1" or "exhaustive" (see ``vnm_mask``).
    masks: the starting masks (base structure, bool at sparse leaves), required
      when ``dense_steps == 0`` (there is no dense stage to compute them from),
      e.g. ``tree_masks(base, ..., permutations=...)``; not allowed otherwise.
    score: what the stage-2/3 masks rank the entries of ``W + s*a@b`` by:
      "magnitude" (the default), "wanda", "ria", an
      :class:`~vnm_jax.scores.Importance`, or a callable
      ``(kernel (K, N), norms (K,) | None) -> scores (K, N)``.
    input_norms: ``{path: (K,) input L2 norms}`` (or a tree of the base's structure),
      one per sparse kernel; required by "wanda" and "ria". Constants of the transform.
    permutations: ``{path: Permutation}`` (or a tree): the V:N:M groups of those
      kernels are formed on permuted channels; base and adapters stay in their order.

  Raises:
    ValueError/TypeError at construction for bad stage lengths, a bad ``score``,
    missing norms, or per-path entries that name no sparse kernel; at ``init`` for
    norms or permutations that do not fit their kernel.

  Returns:
    A GradientTransformationExtraArgs with state :class:`ThreeStageLoRAState`;
    ``update(grads, state, adapters, base=base)``.
  """
  inner = optax.with_extra_args_support(inner)
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}.")
  if (dense_steps is None) != (dynamic_steps is None):
    raise ValueError(f"give both dense_steps and dynamic_steps or neither, got "
                     f"dense_steps={dense_steps!r}, dynamic_steps={dynamic_steps!r}.")
  if dense_steps is None:
    dense_steps, dynamic_steps = default_stage_steps(total_steps)
  dense_steps = _check_steps("dense_steps", dense_steps)
  dynamic_steps = _check_steps("dynamic_steps", dynamic_steps)
  if dense_steps + dynamic_steps > total_steps:
    raise ValueError(f"dense_steps + dynamic_steps = {dense_steps} + {dynamic_steps} exceeds "
                     f"total_steps={total_steps}.")
  if dense_steps == 0 and masks is None:
    raise ValueError("dense_steps=0 needs masks= (the masks stage 2/3 start from, e.g. "
                     "vnm_jax.trees.tree_masks(base, config)).")
  if dense_steps > 0 and masks is not None:
    raise ValueError(f"masks= is the starting mask when there is no dense stage; with "
                     f"dense_steps={dense_steps} the first masks are computed at step "
                     f"{dense_steps}. Pass dense_steps=0 to start from these masks.")
  check_update_every(update_every)
  check_rule(rule)
  if not regularization >= 0:
    raise ValueError(f"regularization must be >= 0, got {regularization!r}.")
  scoring = mask_scoring(configs, score, input_norms, permutations, "three_stage_lora")
  sparse_start = dense_steps + dynamic_steps  # first step of stage 3

  def stage_of(step):
    return jnp.where(step < dense_steps, DENSE_STAGE,
                     jnp.where(step < sparse_start, DYNAMIC_STAGE, FIXED_STAGE)).astype(jnp.int32)

  def init_fn(adapters):
    config_leaves, treedef = jax.tree_util.tree_flatten(configs, is_leaf=is_none)
    adapter_leaves = flatten_like(configs, adapters, "adapters", is_leaf=is_none)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(configs, is_leaf=is_none)[0]]
    for path, config, adapter in zip(paths, config_leaves, adapter_leaves):
      if config is not None and adapter is None:
        raise ValueError(f"configs{path} = {config} but adapters{path} is None: three_stage_lora "
                         f"trains sparse kernels through their adapters. Add an adapter there "
                         f"(init_lora's filter) or keep the kernel dense in configs.")
    check_scoring_shapes(scoring, [None if a is None else (a.a.shape[0], a.b.shape[1])
                                   for a in adapter_leaves], "three_stage_lora")
    if masks is None:
      first = [None if c is None else jnp.ones((a.a.shape[0], a.b.shape[1]), jnp.bool_)
               for c, a in zip(config_leaves, adapter_leaves)]
    else:
      first = flatten_like(configs, masks, "masks", is_leaf=is_none)
      for path, config, adapter, mask in zip(paths, config_leaves, adapter_leaves, first):
        if (config is None) != (mask is None):
          given = "None" if mask is None else "an array"
          raise ValueError(f"masks{path} must be given exactly where configs{path} is a "
                           f"VNMConfig (config {config}, mask {given}).")
        if mask is not None and (mask.dtype != jnp.bool_ or
                                 mask.shape != (adapter.a.shape[0], adapter.b.shape[1])):
          raise ValueError(f"masks{path} must be a bool array of the kernel's shape "
                           f"{(adapter.a.shape[0], adapter.b.shape[1])}, got {mask.dtype} "
                           f"{mask.shape}.")
      # Own copies: a train step that donates the state must not delete the caller's masks.
      first = [None if m is None else jnp.copy(m) for m in first]
    # Separate buffers for every scalar: a donating train step must not see one twice.
    step = jnp.zeros((), jnp.int32)
    return ThreeStageLoRAState(step=step, stage=stage_of(step), masks=treedef.unflatten(first),
                               mask_changes=jnp.zeros((), jnp.int32),
                               flip_rate=jnp.zeros((), jnp.float32),
                               inner_state=inner.init(adapters))

  def update_fn(grads, state, params=None, *, base=None, **extra_args):
    if params is None:
      raise ValueError("three_stage_lora.update needs the adapters: call "
                       "update(grads, opt_state, adapters, base=base).")
    if base is None:
      raise ValueError("three_stage_lora.update needs the frozen base params: call "
                       "update(grads, opt_state, adapters, base=base).")
    base_leaves, treedef = jax.tree_util.tree_flatten(base)
    config_leaves = check_configs(configs, base)
    adapter_leaves = _check_adapters(params, base)
    mask_leaves = check_masks(state.masks, base)
    grad_leaves = treedef.flatten_up_to(grads)

    def regularized():
      out = []
      for w, adapter, grad, mask in zip(base_leaves, adapter_leaves, grad_leaves, mask_leaves):
        if mask is None:
          out.append(grad)
          continue
        # d/d(a, b) of lambda/2 * ||(W + s a b) * (1 - M)||^2 with R = lambda (W + s a b)(1 - M).
        residual = regularization * jnp.where(
            mask, 0.0, w.astype(jnp.float32) + adapter.delta())
        grad_a = adapter.scale * jnp.matmul(residual, adapter.b.T.astype(jnp.float32))
        grad_b = adapter.scale * jnp.matmul(adapter.a.T.astype(jnp.float32), residual)
        out.append(LoRAAdapter(a=grad.a + grad_a.astype(grad.a.dtype),
                               b=grad.b + grad_b.astype(grad.b.dtype), scale=grad.scale))
      return out

    if regularization > 0 and dynamic_steps > 0:
      grad_leaves = jax.lax.cond(state.stage == DYNAMIC_STAGE, regularized, lambda: grad_leaves)
    updates, inner_state = inner.update(treedef.unflatten(grad_leaves), state.inner_state,
                                        params, **extra_args)
    step = state.step + 1

    def effective_weights():
      new_adapters = _check_adapters(optax.apply_updates(params, updates), base)
      return [_effective(w, a, None) for w, a in zip(base_leaves, new_adapters)]

    # Stage 2 recomputes every update_every steps, and once more on entering stage 3;
    # without stages 1 and 2 the given masks stay fixed from the start.
    refresh = ((step >= dense_steps) & (step < sparse_start)
               & ((step - dense_steps) % update_every == 0)) | (step == sparse_start)
    new_masks, mask_changes, flip_rate = refresh_masks(
        refresh if sparse_start > 0 else False, effective_weights, config_leaves, rule,
        mask_leaves, state.mask_changes, state.flip_rate, scoring)
    return updates, ThreeStageLoRAState(step=step, stage=stage_of(step),
                                        masks=treedef.unflatten(new_masks),
                                        mask_changes=mask_changes, flip_rate=flip_rate,
                                        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_masks(opt_state: PyTree) -> PyTree:
  """The masks tree of a three-stage LoRA state (possibly inside a chain's state)."""
  return find_state(opt_state, (ThreeStageLoRAState,), "lora_masks").masks


def lora_params(base: PyTree, adapters: PyTree, opt_state: PyTree | None = None) -> PyTree:
  """The params the forward uses: ``(W + scale * a @ b) * mask`` per leaf.

  Leaves without an adapter are W (masked if they have a mask); leaves without a
  mask are not masked. Differentiable with respect to ``adapters`` (the gradient
  through a masked entry is 0); take no gradient with respect to ``base``.

  Args:
    base: the frozen base params (linen dict or ``nnx.State``).
    adapters: from :func:`init_lora` (base structure, None where no adapter).
    opt_state: the state of :func:`three_stage_lora` (or of a chain holding it);
      None for plain dense LoRA (no masks).

  Returns:
    The base params' structure and dtypes.
  """
  base_leaves, treedef = jax.tree_util.tree_flatten(base)
  adapter_leaves = _check_adapters(adapters, base)
  mask_leaves = ([None] * len(base_leaves) if opt_state is None
                 else check_masks(lora_masks(opt_state), base))
  return treedef.unflatten([_effective(w, a, m)
                            for w, a, m in zip(base_leaves, adapter_leaves, mask_leaves)])


def merge_lora(base: PyTree, adapters: PyTree, opt_state: PyTree) -> PyTree:
  """Folds the adapters into the base and keeps the sparsity: ``(W + s * a @ b) * mask``.

  Every sparse kernel of the result is exactly V:N:M (it passes
  ``vnm_jax.masks.is_vnm`` and ``vnm_jax.format.compress(w, config, mask=mask)``).
  A merge that drops the mask, the usual LoRA merge, would make the kernels dense
  again, so the masks are required.

  Args:
    base: the frozen base params.
    adapters: the trained adapters.
    opt_state: the state of :func:`three_stage_lora`, past stage 1.

  Raises:
    ValueError: the state is still in stage 1 (its masks are all ones).
  """
  state = find_state(opt_state, (ThreeStageLoRAState,), "merge_lora")
  if not isinstance(state.stage, jax.core.Tracer) and int(state.stage) == DENSE_STAGE:
    raise ValueError("merge_lora: the state is in stage 1 (dense LoRA, masks all ones), so the "
                     "merged kernels would not be sparse; train past stage 1 first.")
  return lora_params(base, adapters, opt_state)
