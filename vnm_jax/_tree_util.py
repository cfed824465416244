"""Private helpers for parameter trees, shared inside the library (not API).

Two kinds of helper live here, so that no public module imports another's privates:

- per-path inputs: the canonical path (without ``params/``), regex patterns keyed by
  path (``configs=``, ``in_axes=``), their first match, the contraction axes of an nD
  kernel, and short previews of paths for error messages (used by
  :mod:`vnm_jax.trees` and :mod:`vnm_jax.permutation_search.reports`);
- trees that must have the params' structure (configs, masks, adapters with None at
  dense leaves): flattening them like the params and checking every entry, with the
  leaf's path in the message (used by :mod:`vnm_jax.sparse_training` and
  :mod:`vnm_jax.lora`).

Path strings themselves (:func:`vnm_jax.trees.path_str`,
:func:`vnm_jax.trees.leaves_by_path`) are public and live in :mod:`vnm_jax.trees`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vnm_jax.config import VNMConfig

PyTree = Any


# ----------------------------------------------------------------------------------
# Per-path inputs

# Per-path inputs match a linen ``variables`` dict's leaves with or without it.
LINEN_PARAMS_PREFIX = "params/"


def canonical_path(path: str) -> str:
  """A path string without its leading linen collection name ``params/``."""
  return path[len(LINEN_PARAMS_PREFIX):] if path.startswith(LINEN_PARAMS_PREFIX) else path


def shape_of(leaf) -> tuple[int, ...] | None:
  """The leaf's shape as a tuple, or None when it has none."""
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)


def preview(paths: Sequence[str], count: int = 6) -> str:
  """The first ``count`` paths, quoted, for an error message."""
  shown = ", ".join(repr(p) for p in paths[:count])
  return shown + (f", ... ({len(paths)} in all)" if len(paths) > count else "")


def compile_regex(pattern, argument: str) -> re.Pattern:
  """``re.compile(pattern)``, with errors that name ``argument``."""
  if not isinstance(pattern, str):
    raise TypeError(f"{argument} patterns must be regex strings, got {pattern!r} "
                    f"({type(pattern).__name__}).")
  try:
    return re.compile(pattern)
  except re.error as error:
    raise ValueError(f"{argument} has an invalid regular expression {pattern!r}: {error}.") \
        from None


def compile_patterns(mapping, argument: str, parse_value) -> list[tuple[str, re.Pattern, Any]]:
  """``[(pattern, compiled, parse_value(value, where))]`` of a ``{regex: value}`` mapping."""
  if mapping is None:
    return []
  if not isinstance(mapping, Mapping):
    raise TypeError(f"{argument} must be a mapping from path regex to value, got "
                    f"{type(mapping).__name__}.")
  return [(pattern, compile_regex(pattern, argument),
           parse_value(value, f"{argument}[{pattern!r}]"))
          for pattern, value in mapping.items()]


def first_match(patterns, path: str):
  """``(pattern, value)`` of the first compiled pattern found in ``path``, or (None, None)."""
  for pattern, compiled, value in patterns:
    if compiled.search(path) is not None:
      return pattern, value
  return None, None


def contraction_axes(path: str, shape: Sequence[int], axes_patterns):
  """The ``in_axes`` of a selected kernel: None for 2D, the first match otherwise.

  Raises:
    ValueError: a kernel with more than 2 dims that no ``in_axes`` pattern names.
  """
  if len(shape) <= 2:
    return None
  pattern, axes = first_match(axes_patterns, path)
  if pattern is None:
    raise ValueError(f"{path!r} has shape {tuple(shape)}: a kernel with more than 2 dims needs "
                     f"its contraction axes in in_axes, e.g. in_axes={{{path!r}: (0,)}}.")
  return axes


# ----------------------------------------------------------------------------------
# Trees of the params' structure


def is_none(x) -> bool:
  return x is None


def leaf_paths(params: PyTree) -> list[str]:
  """Readable paths (``jax.tree_util.keystr``) of the params' leaves, in flatten order."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def flatten_like(params: PyTree, tree: PyTree, name: str, is_leaf=None) -> list:
  """The entries of ``tree`` at the positions of the params' leaves (None where dense).

  ``is_leaf`` applies to ``params`` (``is_none`` when the reference is itself a
  configs or masks tree).

  Raises:
    ValueError: ``tree`` does not have the params' structure.
  """
  # nnx.Optimizer keeps its state in OptVariable nodes where the params have Param
  # nodes: compare the trees without their Variable wrappers.
  treedef = jax.tree_util.tree_structure(nnx.as_pure(params), is_leaf=is_leaf)
  try:
    return treedef.flatten_up_to(nnx.as_pure(tree))
  except (ValueError, TypeError) as error:
    raise ValueError(f"{name} must have the params' structure (with None at dense leaves); "
                     f"params are {treedef}, {name} is "
                     f"{jax.tree_util.tree_structure(tree, is_leaf=is_none)}: {error}") from None


def check_configs(configs: PyTree, params: PyTree, name: str = "configs") -> list:
  """Flattened per-leaf VNMConfig | None, validated against the params.

  Raises:
    ValueError/TypeError naming the leaf's path when the structure differs, an
    entry is not a VNMConfig or None, or a sparse leaf is not a 2D kernel.
  """
  entries = flatten_like(params, configs, name)
  for path, config, leaf in zip(leaf_paths(params), entries, jax.tree_util.tree_leaves(params)):
    if config is None:
      continue
    if not isinstance(config, VNMConfig):
      raise TypeError(f"{name}{path} must be a VNMConfig or None, got {config!r}.")
    if jnp.ndim(leaf) != 2:
      raise ValueError(f"{name}{path} = {config} applies to a leaf of shape {jnp.shape(leaf)}; "
                       f"sparse leaves must be 2D kernels (in_features, out_features).")
  return entries


def check_masks(masks: PyTree, params: PyTree, name: str = "masks") -> list:
  """Flattened per-leaf bool mask | None, validated against the params.

  Raises:
    ValueError/TypeError naming the leaf's path when the structure differs or a
    mask is not a bool array of the leaf's shape.
  """
  entries = flatten_like(params, masks, name)
  for path, mask, leaf in zip(leaf_paths(params), entries, jax.tree_util.tree_leaves(params)):
    if mask is None:
      continue
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
      raise TypeError(f"{name}{path} must be a bool array (True = kept), got "
                      f"{getattr(mask, 'dtype', type(mask).__name__)}.")
    if mask.shape != jnp.shape(leaf):
      raise ValueError(f"{name}{path} has shape {mask.shape}, the param has shape "
                       f"{jnp.shape(leaf)}.")
  return entries
