"""Private helpers for masks kept in an optimizer state (not API).

:func:`vnm_jax.sr_ste` and :func:`vnm_jax.three_stage_lora` both carry V:N:M masks in
their state and recompute them inside the jitted update; :func:`refresh_masks` is that
step for both (recompute from new weights or keep, and count what changed).
:func:`find_state` finds such a state inside a chain's state.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from vnm_jax.masks import vnm_mask

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


def compute_masks(weights: Sequence, configs: Sequence, rule: str) -> list:
  """Per-leaf V:N:M masks of |weight| (None where the config is None). Jittable."""
  return [None if config is None else vnm_mask(w, config, rule=rule)
          for w, config in zip(weights, configs)]


def _mask_change(old: Sequence, new: Sequence) -> tuple[jax.Array, jax.Array]:
  """(any entry changed: bool scalar, fraction of sparse entries changed: float32)."""
  pairs = [(o, n) for o, n in zip(old, new) if n is not None]
  if not pairs:
    return jnp.bool_(False), jnp.float32(0.0)
  flips = sum(jnp.sum(o != n, dtype=jnp.int32).astype(jnp.float32) for o, n in pairs)
  total = sum(n.size for _, n in pairs)
  return flips > 0, flips / total


def refresh_masks(when: bool | jax.Array, new_weights: Callable[[], Sequence], configs: Sequence,
                  rule: str, masks: list, mask_changes: jax.Array,
                  flip_rate: jax.Array) -> tuple[list, jax.Array, jax.Array]:
  """Recomputes the masks from ``new_weights()`` when ``when`` holds, else keeps them.

  Args:
    when: a Python bool (decided at trace time) or a traced bool scalar (``lax.cond``).
    new_weights: returns the per-leaf weights the new masks are computed from (|w|);
      called only on the recompute branch.
    configs: per-leaf VNMConfig | None.
    rule: the mask rule.
    masks: the current per-leaf masks (None where dense).
    mask_changes: int32 count of recomputations that changed at least one entry.
    flip_rate: float32 share of sparse entries changed at the latest recomputation.

  Returns:
    ``(masks, mask_changes, flip_rate)`` after this step.
  """
  def recompute():
    new_masks = compute_masks(new_weights(), configs, rule)
    changed, new_flip_rate = _mask_change(masks, new_masks)
    return new_masks, mask_changes + changed.astype(jnp.int32), new_flip_rate

  def keep():
    return masks, mask_changes, flip_rate

  if when is True:
    return recompute()
  if when is False:
    return keep()
  return jax.lax.cond(when, recompute, keep)
