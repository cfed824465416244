"""V:N:M masks over a whole model's parameters: a Flax linen param dict or an ``nnx.State``.

Leaves are named by path strings: the tree path's keys joined by "/", e.g.
``"params/Dense_0/kernel"`` in a linen ``variables`` dict, ``"Dense_0/kernel"`` in
``variables["params"]`` and ``"layers/0/kernel"`` in ``nnx.state(model)`` (the trailing
``.value`` of an nnx Variable is not part of the name, so a State of Variables and
its pure form name leaves alike). Filters and per-path patterns see these strings and
use ``re.search`` (match anywhere; anchor with ^ and $ for exact names).

Per-path inputs (``scores``, ``input_norms``, ``permutations``) may be a tree of the
params' structure or a flat dict keyed by path string; they are matched to leaves by
path, with or without the leading linen collection name ``params/``.

Results (:func:`tree_configs`, :func:`tree_masks`) have the params' structure with
``None`` where a leaf stays dense. JAX treats ``None`` as an empty subtree, so map
over such a tree with the results first and ``is_leaf=lambda x: x is None``::

  jax.tree.map(lambda m, p: p if m is None else p * m, masks, params,
               is_leaf=lambda x: x is None)

or use :func:`tree_apply_masks`.

:func:`leaves_by_path` is the one way this library keys per-path data (a flat dict by
path string without ``params/``); :func:`tree_permute` and :func:`tree_unpermute`
reorder the kernels of a tree by a :class:`~vnm_jax.permutation.Permutation` per path.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.config import VNMConfig
from vnm_jax._sparsity_report import LayerDensity, SparsitySummary
from vnm_jax._tree_util import (canonical_path, compile_patterns, compile_regex, contraction_axes,
                                first_match, preview, shape_of)
from vnm_jax.masks import Rule, as_matrix, check_kernel_shape, check_rule, from_matrix, vnm_mask
from vnm_jax.permutation import Permutation, permute, unpermute, validate_permutation
from vnm_jax.scores import Importance, ScoreFn, importance_scores, score_function

PathFilter = str | Callable[[str, Any], bool]

# Paths the default filter keeps dense: token/position embeddings, normalization
# layers, output heads (head, lm_head, *_head) and classifiers. Case-insensitive.
DEFAULT_DENSE_PATTERN = r"(?i)embed|norm|classifier|(^|[/_.])head([/_.\d]|$)"
_DEFAULT_DENSE = re.compile(DEFAULT_DENSE_PATTERN)


def path_str(path: Sequence[Any]) -> str:
  """A tree path (``jax.tree_util`` keys) as a "/"-joined string.

  Handles DictKey (linen dicts, nnx.State), SequenceKey, GetAttrKey and
  FlattenedIndexKey; the trailing ``value`` attribute of an nnx Variable is dropped.
  """
  if isinstance(path, (str, bytes)) or not hasattr(path, "__iter__"):
    raise TypeError(f"path must be a sequence of jax.tree_util keys (as from "
                    f"tree_flatten_with_path), got {path!r}.")
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  parts = []
  for key in keys:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaves_by_path(tree, *, is_leaf=None) -> dict[str, Any]:
  """``{path string: leaf}`` of a tree, paths without a leading linen ``params/``.

  The one way per-path inputs are keyed (see the module docstring): a masks or
  configs tree (None at dense leaves, which are skipped), a flat dict keyed by path
  string (returned as it is, less the prefix) and ``tree=None`` (an empty dict) all
  work. ``is_leaf`` is passed to ``jax.tree_util.tree_flatten_with_path``.
  """
  if tree is None:
    return {}
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {canonical_path(path_str(key_path)): leaf for key_path, leaf in leaves}


def default_filter(path: str, leaf) -> bool:
  """True for 2D leaves named ``kernel`` outside embeddings, norms and heads.

  A leaf is selected when its last path component is ``kernel``, it has exactly 2
  dims (a Dense / nnx.Linear kernel (in, out)) and its path does not match
  :data:`DEFAULT_DENSE_PATTERN` (``embed``, ``norm``, ``classifier`` anywhere;
  ``head`` as a name part: ``head``, ``lm_head``, ``cls_head_0``, not ``heads``).

  A ``kernel`` with more than 2 dims (DenseGeneral, einsum) outside those names stays
  dense: its contraction axes are not guessed. It is named in a :class:`UserWarning`
  (once per kernel and shape) with the fix: select it with ``filter=`` and give its
  contraction axes with ``in_axes=`` (:func:`tree_masks`).
  """
  shape = shape_of(leaf)
  if (path.rsplit("/", 1)[-1] != "kernel" or shape is None or len(shape) < 2
      or _DEFAULT_DENSE.search(path) is not None):
    return False
  if len(shape) > 2:
    warnings.warn(f"{path!r} has shape {shape} and stays dense: the default filter selects 2D "
                  f"kernels only. To prune it, select it with filter= and give its contraction "
                  f"axes with in_axes, e.g. tree_masks(params, config, filter=..., "
                  f"in_axes={{{path!r}: (0,)}}).", UserWarning, stacklevel=2)
    return False
  return True


def path_predicate(filter: PathFilter | None,
                   default: Callable[[str, Any], bool] = default_filter
                   ) -> Callable[[str, Any], bool]:
  """``filter`` as a predicate ``(path, leaf) -> bool``: a regex is searched in the path
  string, a callable is used as is, None gives ``default``."""
  if filter is None:
    return default
  if isinstance(filter, str):
    compiled = compile_regex(filter, "filter")
    return lambda path, leaf: compiled.search(path) is not None
  if callable(filter):
    return filter
  raise TypeError(f"filter must be None, a regex string or a predicate (path, leaf) -> bool, "
                  f"got {filter!r} ({type(filter).__name__}).")


def _parse_config(config, argument: str) -> VNMConfig | None:
  if config is None:
    return None
  try:
    return VNMConfig.parse(config)
  except (TypeError, ValueError) as error:
    raise type(error)(f"{argument}: {error}") from None


def _plan(params, config, filter, configs) -> tuple[list[tuple[str, Any, VNMConfig | None]], Any]:
  """Flattens ``params`` and decides each leaf's config (None = dense)."""
  default_config = _parse_config(config, "config")
  predicate = path_predicate(filter)
  overrides = compile_patterns(configs, "configs", _parse_config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not leaves:
    raise ValueError("params has no leaves; pass a linen param dict or an nnx.State.")
  plan, used, selected = [], set(), []
  for key_path, leaf in leaves:
    path = path_str(key_path)
    if not predicate(path, leaf):
      plan.append((path, leaf, None))
      continue
    shape = shape_of(leaf)
    if shape is None or len(shape) < 2:
      raise ValueError(f"filter selected {path!r} with shape {shape}: V:N:M needs a kernel with "
                       f"at least 2 dims (in, out); narrow the filter, e.g. end it with "
                       f"'kernel$'.")
    check_kernel_shape(shape, f"kernel {path!r}", ndim=None)
    selected.append(path)
    pattern, override = first_match(overrides, path)
    if pattern is not None:
      used.add(pattern)
    plan.append((path, leaf, override if pattern is not None else default_config))
  if not selected:
    raise ValueError(f"filter={filter!r} selected no leaf of params; its paths are "
                     f"{preview([p for p, _, _ in plan])}.")
  unused = [pattern for pattern, _, _ in overrides if pattern not in used]
  if unused:
    raise ValueError(f"configs patterns {unused} match no leaf selected by the filter (the "
                     f"default filter keeps embeddings, norms and heads dense; pass filter= to "
                     f"select them); selected: {preview(selected)}.")
  return plan, treedef


def tree_configs(params, config: VNMConfig | str | None, *, filter: PathFilter | None = None,
                 configs: Mapping[str, VNMConfig | str | None] | None = None):
  """Which V:N:M config each leaf of ``params`` gets.

  Only the tree's structure, paths and leaf shapes are read, so this works on
  arrays, tracers or ``jax.ShapeDtypeStruct`` leaves (e.g. inside a jitted update).

  Args:
    params: a linen param dict (nested dicts) or an ``nnx.State`` (of Variables or pure).
    config: the config of every selected leaf: a VNMConfig, a string such as "64:2:8",
      or None to prune only the leaves that ``configs`` names.
    filter: which leaves may be pruned: None for :func:`default_filter`, a regex
      searched in the path string, or a predicate ``(path, leaf) -> bool``. It replaces
      the default filter; every leaf it selects must have at least 2 dims.
    configs: per-path overrides, ``{regex: VNMConfig | "V:N:M" | None}``, for leaves
      the filter selected; the first pattern (in order) found in the path wins and
      None keeps that leaf dense. Every pattern must match some selected leaf.

  Returns:
    A tree of ``params``' structure with a VNMConfig at each pruned leaf and None at
    dense ones (see the module docstring for mapping over it).
  """
  plan, treedef = _plan(params, config, filter, configs)
  return jax.tree_util.tree_unflatten(treedef, [cfg for _, _, cfg in plan])


def _leaf_scores(path, leaf, axes, score_fn, importance, norms, given_norm_paths):
  """Scores of one kernel: ``score_fn`` on its 2D (in, out) view, back in its shape."""
  matrix = as_matrix(jnp.asarray(leaf), axes)
  if importance is not None and importance.needs_input_norms and norms is None:
    hint = (f"input_norms has entries for {preview(sorted(given_norm_paths))}"
            if given_norm_paths else "no input_norms were given")
    raise ValueError(f"score={importance.value!r} needs input_norms for {path!r} (shape "
                     f"({matrix.shape[0]},)); {hint}. Collect them with "
                     f"vnm_jax.calibration.collect_input_norms.")
  scores = jnp.asarray(score_fn(matrix, norms))
  if scores.shape != matrix.shape:
    raise ValueError(f"score function returned shape {scores.shape} for {path!r}; it must "
                     f"return the (in, out) shape {matrix.shape} of the kernel it was given.")
  return from_matrix(scores, leaf.shape, axes)


def kernel_scores(params, score: Importance | str, *, filter: PathFilter | None = None,
                  input_norms: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """``{path: importance scores}`` of the leaves of ``params`` that ``filter`` selects.

  Args:
    params: a linen param dict or an ``nnx.State``; selected leaves are (in, out) kernels.
    score: an :class:`Importance` or its name ("magnitude", "wanda", "ria").
    filter: as in :func:`tree_configs` (None: the default filter).
    input_norms: ``{path: (in,) norms}`` (from
      :func:`vnm_jax.calibration.collect_input_norms`), needed by "wanda" and "ria".

  Returns:
    A flat dict keyed by path string, ready for ``tree_masks(scores=...)`` or
    :func:`vnm_jax.permutation_search.tree_permutations`.
  """
  importance = Importance.parse(score)
  predicate = path_predicate(filter)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  norms_by_path = _entries_by_path(input_norms, {canonical_path(path_str(p)) for p, _ in leaves},
                                   "input_norms")
  scores = {}
  for key_path, leaf in leaves:
    path = path_str(key_path)
    if not predicate(path, leaf):
      continue
    norms = norms_by_path.get(canonical_path(path))
    if norms is None and importance.needs_input_norms:
      raise ValueError(f"score={importance.value!r} needs input_norms for {path!r}; "
                       f"input_norms has entries for {preview(sorted(norms_by_path)) or 'none'}.")
    try:
      scores[path] = importance_scores(leaf, importance, norms)
    except (TypeError, ValueError) as error:
      raise type(error)(f"while scoring {path!r}: {error}") from None
  if not scores:
    raise ValueError(f"filter={filter!r} selected no leaf of params; its paths are "
                     f"{preview([path_str(p) for p, _ in leaves])}.")
  return scores


def tree_masks(params, config: VNMConfig | str | None, *, filter: PathFilter | None = None,
               configs: Mapping[str, VNMConfig | str | None] | None = None,
               score: Importance | str | ScoreFn = Importance.MAGNITUDE, scores=None,
               input_norms=None, rule: Rule = "column_l1",
               in_axes: Mapping[str, int | Sequence[int]] | None = None, permutations=None):
  """V:N:M masks for the kernels of a model: :func:`vnm_jax.masks.vnm_mask` leaf by leaf.

  Args:
    params: a linen param dict or an ``nnx.State``.
    config, filter, configs: which leaves get which VNMConfig, as in :func:`tree_configs`.
    score: the importance of each entry: an :class:`Importance` or its name
      ("magnitude", "wanda", "ria" with a=0.5), or a callable
      ``(kernel_2d, input_norms_or_None) -> scores_2d`` on the kernel's (in, out) view
      (e.g. ``functools.partial(vnm_jax.scores.ria_score, a=0.25)``).
    scores: precomputed scores (kernel's shape, finite, >= 0) by path; they take
      precedence over ``score`` where given.
    input_norms: per-input-feature activation L2 norms by path, shape (fan_in,) with
      fan_in the flattened contraction size (from
      :func:`vnm_jax.calibration.collect_input_norms`); needed by "wanda" and "ria".
    rule: "column_l1" or "exhaustive", see :func:`vnm_jax.masks.vnm_mask`.
    in_axes: ``{regex: contraction axes}`` for selected kernels with more than 2 dims
      (first match wins); 2D kernels are (in, out) and need none.
    permutations: a :class:`vnm_jax.permutation.Permutation` by path for the kernels
      whose channels were permuted (on the 2D view).

  Returns:
    A tree of ``params``' structure: a bool mask of the leaf's shape (True = kept)
    where pruned, None where dense. Jittable over ``params`` (and array arguments);
    checks on values (NaN, negative) then only run on concrete inputs.
  """
  check_rule(rule)
  score_fn, importance = score_function(score)
  plan, treedef = _plan(params, config, filter, configs)
  axes_patterns = compile_patterns(in_axes, "in_axes", lambda value, _: value)
  paths = {canonical_path(path) for path, _, _ in plan}
  given_scores = _entries_by_path(scores, paths, "scores")
  norms_by_path = _entries_by_path(input_norms, paths, "input_norms")
  permutation_by_path = _entries_by_path(permutations, paths, "permutations",
                                         is_leaf=lambda x: isinstance(x, Permutation))
  masks = []
  for path, leaf, cfg in plan:
    if cfg is None:
      masks.append(None)
      continue
    key = canonical_path(path)
    axes = contraction_axes(path, leaf.shape, axes_patterns)
    try:
      if key in given_scores:
        leaf_scores = given_scores[key]
        if shape_of(leaf_scores) != tuple(leaf.shape):
          raise ValueError(f"scores[{path!r}] has shape {shape_of(leaf_scores)}; it must have "
                           f"the kernel's shape {tuple(leaf.shape)}.")
      else:
        leaf_scores = _leaf_scores(path, leaf, axes, score_fn, importance,
                                   norms_by_path.get(key), norms_by_path.keys())
      masks.append(vnm_mask(leaf, cfg, scores=leaf_scores, rule=rule, in_axes=axes,
                            permutation=permutation_by_path.get(key)))
    except (TypeError, ValueError) as error:
      if path in str(error):
        raise
      raise type(error)(f"while masking {path!r}: {error}") from error
  return jax.tree_util.tree_unflatten(treedef, masks)


def _entries_by_path(tree, params_paths: set[str], argument: str,
                     is_leaf=None) -> dict[str, Any]:
  """:func:`leaves_by_path` of a per-path input, every path of which must be in params."""
  found = leaves_by_path(tree, is_leaf=is_leaf)
  stray = sorted(set(found) - params_paths)
  if stray:
    raise ValueError(f"{argument} has entries for paths that are not in params: "
                     f"{preview(stray)}.")
  return found


def _masks_by_path(masks, params_paths: set[str]) -> dict[str, Any]:
  return _entries_by_path(masks, params_paths, "masks")


def tree_apply_masks(params, masks):
  """``params`` with every masked leaf multiplied by its mask (dtype kept); others unchanged.

  ``masks`` is what :func:`tree_masks` returned (None where dense), or any tree or
  flat dict of bool masks matched to ``params`` by path.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  masks_found = _masks_by_path(masks, {canonical_path(path_str(p)) for p, _ in leaves})

  def apply(key_path, leaf):
    path = path_str(key_path)
    mask = masks_found.get(canonical_path(path))
    if mask is None:
      return leaf
    if shape_of(mask) != shape_of(leaf):
      raise ValueError(f"masks[{path!r}] has shape {shape_of(mask)}; the parameter has shape "
                       f"{shape_of(leaf)}.")
    if getattr(mask, "dtype", None) != jnp.bool_:
      raise TypeError(f"masks[{path!r}] must be a bool array (True = kept), got dtype "
                      f"{getattr(mask, 'dtype', type(mask).__name__)}.")
    leaf = jnp.asarray(leaf)
    return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

  return jax.tree_util.tree_map_with_path(apply, params)


def _reorder(tree, permutations, undo: bool):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  found = _entries_by_path(permutations, {canonical_path(path_str(p)) for p, _ in leaves},
                           "permutations", is_leaf=lambda x: isinstance(x, Permutation))

  def reorder(key_path, leaf):
    path = path_str(key_path)
    permutation = found.get(canonical_path(path))
    if permutation is None:
      return leaf
    if len(shape_of(leaf) or ()) != 2:
      raise ValueError(f"permutations[{path!r}] applies to a leaf of shape {shape_of(leaf)}; "
                       f"a Permutation reorders a 2D (in, out) kernel.")
    validate_permutation(permutation, shape_of(leaf))
    leaf = jnp.asarray(leaf)
    return unpermute(leaf, permutation) if undo else permute(leaf, permutation)

  return jax.tree_util.tree_map_with_path(reorder, tree)


def tree_permute(tree, permutations):
  """Every kernel that ``permutations`` names as ``kernel[inputs][:, outputs]``.

  V:N:M groups formed on a permuted kernel (``vnm_mask`` without a permutation) are
  the groups ``vnm_mask(kernel, config, permutation=p)`` forms on the original one:
  a recipe can store and train its kernels permuted, and map them back for the
  forward pass with :func:`tree_unpermute`.

  Args:
    tree: params (a linen dict or an ``nnx.State``), masks (None where dense) or any
      tree whose leaves at the permuted paths are 2D (in, out) arrays.
    permutations: a :class:`~vnm_jax.permutation.Permutation` by path (a flat dict
      keyed by path string, as :func:`vnm_jax.tree_permutations` returns, or a tree),
      matched with or without the leading ``params/``; paths it does not name are
      returned unchanged. Jittable, also with the permutations as traced arguments.

  Raises:
    ValueError: a path not in ``tree``, a leaf that is not 2D, or an ordering that
      does not fit its kernel.
  """
  return _reorder(tree, permutations, undo=False)


def tree_unpermute(tree, permutations):
  """Inverse of :func:`tree_permute`: every named kernel back in original coordinates."""
  return _reorder(tree, permutations, undo=True)


def sparsity_summary(params, masks, configs=None) -> SparsitySummary:
  """Per-leaf and total densities of ``params`` under ``masks``.

  Args:
    params: a linen param dict or an ``nnx.State``.
    masks: bool masks by path (as returned by :func:`tree_masks`; None = dense).
    configs: optional configs by path (as returned by :func:`tree_configs`), shown
      in the table.

  Returns:
    A :class:`SparsitySummary`. Density counts the mask's True entries; a leaf
    without a mask counts as fully dense.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  masks_found = _masks_by_path(masks, {canonical_path(path_str(p)) for p, _ in leaves})
  configs_found = leaves_by_path(configs, is_leaf=lambda x: isinstance(x, VNMConfig))
  layers, dense_leaves, dense_size = [], 0, 0
  for key_path, leaf in leaves:
    path = path_str(key_path)
    shape = shape_of(leaf) or ()
    mask = masks_found.get(canonical_path(path))
    if mask is None:
      dense_leaves += 1
      dense_size += math.prod(shape)
      continue
    if shape_of(mask) != shape:
      raise ValueError(f"masks[{path!r}] has shape {shape_of(mask)}; the parameter has shape "
                       f"{shape}.")
    layers.append(LayerDensity(path, shape, configs_found.get(canonical_path(path)),
                               int(np.count_nonzero(np.asarray(mask))), math.prod(shape)))
  return SparsitySummary(tuple(layers), dense_leaves, dense_size)
