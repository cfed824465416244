"""Private helpers for masks kept in an optimizer state (not API).

:func:`vnm_jax.sr_ste` and :func:`vnm_jax.three_stage_lora` both carry V:N:M masks in
their state and recompute them inside the jitted update; :func:`refresh_masks` is that
step for both (recompute from new weights or keep, and count what changed).
:func:`mask_scoring` resolves, once at construction, the importance the recomputed masks
use (magnitude, Wanda, RIA or a callable, with input norms and channel permutations by
path) into per-leaf lists. :func:`find_state` finds such a state inside a chain's state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax._tree_util import canonical_path, is_none, preview
from vnm_jax.masks import vnm_mask
from vnm_jax.permutation import Permutation, validate_permutation
from vnm_jax.scores import Importance, ScoreFn, score_function
from vnm_jax.trees import leaves_by_path, path_str

PyTree = Any


def check_update_every(update_every: int) -> None:
  if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
    raise ValueError(f"update_every must be an int >= 1 (recompute the mask every k steps), "
                     f"got {update_every!r}.")


def find_state(opt_state: PyTree, types: tuple[type, ...], caller: str):
  """The single state of one of ``types`` inside an optax state (a chain's tuple, ...)."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state,
                                                is_leaf=lambda x: isinstance(x, types))
           if isinstance(s, types)]
  names = " or ".join(t.__name__ for t in types)
  if len(found) != 1:
    raise ValueError(f"{caller} needs an optimizer state holding exactly one {names}, found "
                     f"{len(found)} in {type(opt_state).__name__}; pass the state of the "
                     f"transformation that owns the masks.")
  return found[0]


class MaskScoring(NamedTuple):
  """What a recomputed mask ranks entries by, per leaf of the params (flatten order).

  Attributes:
    score_fn: ``(kernel (K, N), norms (K,) | None) -> scores (K, N)``; None for |W|.
    norms: per leaf, float32 (K,) input norms or None.
    permutations: per leaf, the :class:`Permutation` the V:N:M groups are formed on, or None.
    paths: per leaf, its path string (for error messages).
  """

  score_fn: ScoreFn | None
  norms: list
  permutations: list
  paths: list


def _norms_array(norms, path: str, caller: str) -> jax.Array:
  if isinstance(norms, jax.core.Tracer):
    raise TypeError(f"{caller}: input_norms[{path!r}] is a tracer; pass concrete norms (they "
                    f"are constants of the transformation), built outside jit.")
  values = np.asarray(norms)
  if values.ndim != 1 or not np.issubdtype(values.dtype, np.number):
    raise ValueError(f"{caller}: input_norms[{path!r}] must be a 1D array of per-input-feature "
                     f"L2 norms (in_features,), got {values.dtype} {values.shape}.")
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"{caller}: input_norms[{path!r}] must be finite and >= 0 (L2 norms), got "
                     f"min {np.nanmin(values):.4g}, {int(np.sum(~np.isfinite(values)))} "
                     f"non-finite entries.")
  return jnp.asarray(values, jnp.float32)


def mask_scoring(configs, score, input_norms, permutations, caller: str) -> MaskScoring:
  """Validates ``score=``, ``input_norms=`` and ``permutations=`` against a configs tree.

  Runs at construction (no params yet): the paths of ``configs`` name the leaves; every
  per-path entry must name one of them, and entries at dense leaves are ignored.

  Args:
    configs: the configs tree (VNMConfig at sparse leaves, None elsewhere).
    score: an :class:`Importance`, its name, or a callable (see :class:`MaskScoring`).
    input_norms: ``{path: (K,) norms}`` or a tree of the params' structure; required by
      "wanda" and "ria", passed to a callable where given, refused with "magnitude".
    permutations: ``{path: Permutation}`` (or a tree); None keeps every channel order.
    caller: the transformation's name, for messages.
  """
  score_fn, importance = score_function(score)
  entries = jax.tree_util.tree_flatten_with_path(configs, is_leaf=is_none)[0]
  paths = [path_str(p) for p, _ in entries]
  sparse = {p for p, (_, c) in zip(paths, entries) if c is not None}
  keys = {p: canonical_path(p) for p in paths}
  sparse_keys = {keys[p] for p in sparse}
  norms_by_key = leaves_by_path(input_norms)
  perms_by_key = leaves_by_path(permutations, is_leaf=lambda x: isinstance(x, Permutation))
  # Entries at dense leaves are ignored, as tree_masks does (collect_input_norms returns
  # norms for every Linear, heads included); paths that name no leaf are typos.
  for argument, found in (("input_norms", norms_by_key), ("permutations", perms_by_key)):
    stray = sorted(set(found) - set(keys.values()))
    if stray:
      raise ValueError(f"{caller}: {argument} has entries for {preview(stray)}, which name no "
                       f"leaf of configs; its sparse leaves are {preview(sorted(sparse_keys))}.")
  norms_by_key = {k: v for k, v in norms_by_key.items() if k in sparse_keys}
  perms_by_key = {k: v for k, v in perms_by_key.items() if k in sparse_keys}
  if importance is Importance.MAGNITUDE and norms_by_key:
    raise ValueError(f"{caller}: input_norms were given but score='magnitude' does not use "
                     f"them; pass score='wanda' or 'ria' (or a callable) to use them.")
  if importance is not None and importance.needs_input_norms:
    missing = sorted(sparse_keys - set(norms_by_key))
    if missing:
      raise ValueError(f"{caller}: score={importance.value!r} needs input_norms for every "
                       f"sparse leaf; missing {preview(missing)}. Collect them with "
                       f"vnm_jax.collect_input_norms.")
  for key, permutation in perms_by_key.items():
    if not isinstance(permutation, Permutation):
      raise TypeError(f"{caller}: permutations[{key!r}] must be a vnm_jax.Permutation, got "
                      f"{type(permutation).__name__}.")
  norms = [None if keys[p] not in norms_by_key or p not in sparse
           else _norms_array(norms_by_key[keys[p]], p, caller) for p in paths]
  perms = [perms_by_key.get(keys[p]) if p in sparse else None for p in paths]
  magnitude = importance is Importance.MAGNITUDE
  return MaskScoring(None if magnitude else score_fn, norms, perms, paths)


def check_scoring_shapes(scoring: MaskScoring, shapes: Sequence, caller: str) -> None:
  """Checks each leaf's norms and permutation against its kernel shape (K, N)."""
  for path, shape, norms, permutation in zip(scoring.paths, shapes, scoring.norms,
                                             scoring.permutations):
    if shape is None:
      continue
    if norms is not None and norms.shape != (shape[0],):
      raise ValueError(f"{caller}: input_norms[{path!r}] has shape {norms.shape}; the kernel "
                       f"is {tuple(shape)}, so it must be ({shape[0]},).")
    try:
      validate_permutation(permutation, tuple(shape))
    except (TypeError, ValueError) as error:
      raise type(error)(f"{caller}: permutations[{path!r}]: {error}") from None


def compute_masks(weights: Sequence, configs: Sequence, rule: str,
                  scoring: MaskScoring | None = None) -> list:
  """Per-leaf V:N:M masks (None where the config is None). Jittable.

  Entries are ranked by |weight| without ``scoring``, else by ``scoring.score_fn`` of
  the weight and its norms, with groups formed on the leaf's permutation.
  """
  masks = []
  for i, (w, config) in enumerate(zip(weights, configs)):
    if config is None:
      masks.append(None)
    elif scoring is None:
      masks.append(vnm_mask(w, config, rule=rule))
    else:
      scores = None if scoring.score_fn is None else scoring.score_fn(w, scoring.norms[i])
      masks.append(vnm_mask(w, config, scores=scores, rule=rule,
                            permutation=scoring.permutations[i]))
  return masks


def _mask_change(old: Sequence, new: Sequence) -> tuple[jax.Array, jax.Array]:
  """(any entry changed: bool scalar, fraction of sparse entries changed: float32)."""
  pairs = [(o, n) for o, n in zip(old, new) if n is not None]
  if not pairs:
    return jnp.bool_(False), jnp.float32(0.0)
  flips = sum(jnp.sum(o != n, dtype=jnp.int32).astype(jnp.float32) for o, n in pairs)
  total = sum(n.size for _, n in pairs)
  return flips > 0, flips / total


def refresh_masks(when: bool | jax.Array, new_weights: Callable[[], Sequence], configs: Sequence,
                  rule: str, masks: list, mask_changes: jax.Array, flip_rate: jax.Array,
                  scoring: MaskScoring | None = None) -> tuple[list, jax.Array, jax.Array]:
  """Recomputes the masks from ``new_weights()`` when ``when`` holds, else keeps them.

  Args:
    when: a Python bool (decided at trace time) or a traced bool scalar (``lax.cond``).
    new_weights: returns the per-leaf weights the new masks are computed from;
      called only on the recompute branch.
    configs: per-leaf VNMConfig | None.
    rule: the mask rule.
    masks: the current per-leaf masks (None where dense).
    mask_changes: int32 count of recomputations that changed at least one entry.
    flip_rate: float32 share of sparse entries changed at the latest recomputation.
    scoring: the importance and permutations (see :func:`compute_masks`).

  Returns:
    ``(masks, mask_changes, flip_rate)`` after this step.
  """
  def recompute():
    new_masks = compute_masks(new_weights(), configs, rule, scoring)
    changed, new_flip_rate = _mask_change(masks, new_masks)
    return new_masks, mask_changes + changed.astype(jnp.int32), new_flip_rate

  def keep():
    return masks, mask_changes, flip_rate

  if when is True:
    return recompute()
  if when is False:
    return keep()
  return jax.lax.cond(when, recompute, keep)
