"""Flax layers that run a compressed V:N:M weight, and converting a trained model to them.

- :class:`VNMLinear` (nnx) and :class:`VNMDense` (linen) compute
  ``vnm_matmul(x, W) + bias``. By default (``prepare=True``) a layer is an inference
  layer: it holds the stored weight *and* the layout its implementation reads
  (:func:`vnm_jax.ops.vnm_matmul.prepare`, built once at construction), so a call runs
  no op on the weight; the weight is then constant (gradients flow to x and the bias,
  differentiating the weight raises). With ``prepare=False`` the layer holds the stored
  weight only, its values are trainable parameters (a compressed model can be
  fine-tuned) and every call prepares the weight on the fly (slower).
- Variables. nnx: ``meta``, ``columns``, ``output_index`` (:class:`VNMIndex`), ``bias``,
  and ``values`` (``nnx.Param``) when ``prepare=False``; when prepared, ``layout``
  (:class:`VNMPrepared` leaves), which holds the values exactly (``layer.weight`` reads
  them back), and ``values`` (:class:`VNMPrepared`) only if the layout is in another
  dtype than the stored values. linen: ``params`` {"bias", and "values" when not
  prepared}; the ``"vnm"`` collection {"meta", "columns", "output_index" when permuted,
  and "layout" (and "values" in the other-dtype case) when prepared}.
  ``prepare=False`` is exactly the variable structure of earlier versions, so their
  checkpoints restore into such a model.
- :func:`convert_to_vnm` converts a whole trained model in one call: every dense kernel
  that has a mask is compressed with it (and prepared). An nnx model has its
  ``nnx.Linear`` modules replaced by :class:`VNMLinear` in place; a linen variables
  dict is turned into the variables of the same model built with :class:`VNMDense` in
  place of ``nn.Dense`` (same module names).

Masks are matched to kernels by path (``vnm_jax.trees.path_str``), as
:func:`vnm_jax.trees.tree_masks` produces them: a tree of the params' structure with
None where a kernel stays dense, or a flat ``{path: mask}`` dict.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.format import VNMWeight, compress
from vnm_jax.masks import check_kernel_shape
from vnm_jax.ops.vnm_matmul.api import vnm_matmul
from vnm_jax.ops.vnm_matmul.prepared import (PreparedVNMWeight, build_layout,
                                             check_implementation, prepare,
                                             resolve_implementation)
from vnm_jax.permutation import Permutation
from vnm_jax.trees import path_str

VNM_COLLECTION = "vnm"
_LINEN_PARAMS = "params"


class VNMIndex(nnx.Variable):
  """An integer layout array of a VNMWeight (meta, columns, output_index): never trained."""


class VNMPrepared(nnx.Variable):
  """An array of a layer prepared for inference (its values and their layout): constant."""


def _is_variable(a) -> bool:
  return isinstance(a, nnx.Variable)


class VNMLinear(nnx.Module):
  """``y = vnm_matmul(x, W) + bias``: an ``nnx.Linear`` whose kernel is V:N:M-compressed.

  Args:
    weight: the :class:`~vnm_jax.format.VNMWeight` (validated here).
    bias: (N,) or None.
    dtype: the computation dtype (x is cast to it; the layout is prepared in it), or
      None for x's (the layout is then prepared in the values' dtype).
    implementation: None, "pallas" or "xla", as for :func:`vnm_jax.vnm_matmul`; a
      prepared layer resolves None once, here, for the backend it is built on.
    prepare: hold the prepared layout (inference, the default) or not (trainable values).
  """

  def __init__(self, weight: VNMWeight, bias: jax.Array | None = None, *, dtype=None,
               implementation: str | None = None, prepare: bool = True):
    if not isinstance(weight, VNMWeight):
      raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}.")
    check_implementation(implementation)
    weight.validate()
    if bias is not None and jnp.shape(bias) != (weight.shape[1],):
      raise ValueError(f"bias must have shape ({weight.shape[1]},), got {jnp.shape(bias)}.")
    self.shape = weight.shape
    self.config = weight.config
    self.dtype = dtype
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    self.meta = VNMIndex(weight.meta)
    self.columns = VNMIndex(weight.columns)
    self.output_index = (None if weight.output_index is None
                         else VNMIndex(weight.output_index))
    if prepare:
      prepared = _prepare_for_layer(weight, implementation, dtype)
      self.implementation = prepared.implementation
      # The layout holds the values exactly (read back by .weight) unless in another dtype.
      self.values = None if prepared.values is None else VNMPrepared(prepared.values)
      self.layout = nnx.data(jax.tree.map(VNMPrepared, prepared.layout))
    else:
      self.implementation = implementation
      self.values = nnx.Param(weight.values)
      self.layout = None

  @classmethod
  def from_linear(cls, linear: nnx.Linear, config: VNMConfig | str, *,
                  mask: jax.Array | None = None, permutation: Permutation | None = None,
                  implementation: str | None = None, prepare: bool = True) -> VNMLinear:
    """Compresses a trained ``nnx.Linear`` with its V:N:M ``mask`` (None: computed by magnitude).

    ``mask`` must be V:N:M (after ``permutation``, if given); see
    :func:`vnm_jax.format.compress`. The layer keeps the Linear's bias and dtype.
    """
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}.")
    weight = compress(linear.kernel[...], config, mask=mask, permutation=permutation)
    bias = None if linear.bias is None else linear.bias[...]
    return cls(weight, bias, dtype=linear.dtype, implementation=implementation,
               prepare=prepare)

  @property
  def weight(self) -> VNMWeight:
    """The layer's kernel as the stored :class:`~vnm_jax.format.VNMWeight` (exact)."""
    if self.layout is not None:
      return self.prepared.weight
    output_index = None if self.output_index is None else self.output_index[...]
    return VNMWeight(self.values[...], self.meta[...], self.columns[...], output_index,
                     self.shape, self.config)

  @property
  def prepared(self) -> PreparedVNMWeight | None:
    """The weight with its prepared layout (what a call runs), or None when not prepared."""
    if self.layout is None:
      return None
    layout = jax.tree.map(lambda v: v[...], self.layout, is_leaf=_is_variable)
    output_index = None if self.output_index is None else self.output_index[...]
    values = None if self.values is None else self.values[...]
    return PreparedVNMWeight(layout, self.meta[...], self.columns[...], output_index, values,
                             self.shape, self.config, self.implementation)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., out_features)."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    prepared = self.prepared
    if prepared is not None:
      y = vnm_matmul(x, prepared)
    else:
      y = vnm_matmul(x, self.weight, implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


def _prepare_for_layer(weight: VNMWeight, implementation, dtype) -> PreparedVNMWeight:
  dtype = weight.values.dtype if dtype is None else dtype
  return prepare(weight, implementation=implementation, dtype=dtype, validate=False)


def _default_layout(k: int, n: int, config: VNMConfig) -> dict[str, np.ndarray]:
  """A valid layout for linen ``init``: the first 4 features of every group, positions (0, 1)."""
  groups, row_blocks, half = -(-k // config.m), -(-n // config.v), -(-config.v // 2)
  columns = (np.arange(groups)[None, :] * config.m + np.arange(KEPT_COLUMNS)[:, None])
  nibble = 0 | 1 << 2
  return dict(meta=np.full((row_blocks, groups, half), nibble | nibble << 4, np.uint8),
              columns=np.broadcast_to(columns, (row_blocks, KEPT_COLUMNS, groups))
              .astype(np.int32))


class VNMDense(nn.Module):
  """Linen ``y = vnm_matmul(x, W) + bias``: ``nn.Dense`` with a V:N:M-compressed kernel.

  Variables (module docstring): ``params`` {"bias", "values" unless prepared} and the
  ``"vnm"`` collection {"meta", "columns", "output_index" when ``permuted_outputs``,
  "layout" when prepared, and "values" when prepared with ``dtype`` other than
  ``param_dtype``}. ``init`` creates zero values on a valid
  placeholder layout; the real ones come from :func:`convert_to_vnm` (or
  :meth:`variables_from_dense`), built for the same ``implementation`` and ``prepare``.

  Attributes:
    features: out_features N.
    in_features: K (the compressed kernel's rows; the layer cannot infer it from x
      before it has weights).
    config: the VNMConfig (or "V:N:M").
    use_bias: whether there is a bias.
    permuted_outputs: whether the weight stores an output permutation.
    dtype: computation dtype (and the prepared layout's), or None for x's.
    param_dtype: dtype of values and bias at init.
    implementation: passed to :func:`vnm_jax.vnm_matmul`.
    prepare: hold the prepared layout (inference; values constant) or not (values trainable).
  """

  features: int
  in_features: int
  config: VNMConfig | str
  use_bias: bool = True
  permuted_outputs: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: str | None = None
  prepare: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., features)."""
    config = VNMConfig.parse(self.config)
    check_implementation(self.implementation)
    k, n = check_kernel_shape((self.in_features, self.features), "(in_features, features)")
    groups, row_blocks = -(-k // config.m), -(-n // config.v)
    values_shape = (row_blocks, 2, groups, config.v)
    compute_dtype = jnp.dtype(self.param_dtype if self.dtype is None else self.dtype)
    # A prepared layer's layout holds the values, unless it is in another dtype than they.
    keep_values = not self.prepare or compute_dtype != jnp.dtype(self.param_dtype)
    values = jnp.zeros(values_shape, self.param_dtype)
    if not self.prepare:
      values = self.param("values", nn.initializers.zeros_init(), values_shape,
                          self.param_dtype)
    elif keep_values:
      values = self.variable(VNM_COLLECTION, "values", jnp.zeros, values_shape,
                             self.param_dtype).value
    placeholder = _default_layout(k, n, config)
    meta = self.variable(VNM_COLLECTION, "meta", lambda: jnp.asarray(placeholder["meta"]))
    columns = self.variable(VNM_COLLECTION, "columns",
                            lambda: jnp.asarray(placeholder["columns"]))
    output_index = None
    if self.permuted_outputs:
      output_index = self.variable(VNM_COLLECTION, "output_index",
                                   lambda: jnp.arange(n, dtype=jnp.int32)).value
    weight = VNMWeight(values, meta.value, columns.value, output_index, (k, n), config)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.prepare:
      implementation = resolve_implementation(self.implementation, config, compute_dtype)
      layout = self.variable(VNM_COLLECTION, "layout", lambda: build_layout(
          weight.values, weight.meta, weight.columns, m=config.m,
          implementation=implementation, dtype=compute_dtype)).value
      y = vnm_matmul(x, PreparedVNMWeight(layout, weight.meta, weight.columns, output_index,
                                          values if keep_values else None, (k, n), config,
                                          implementation))
    else:
      y = vnm_matmul(x, weight, implementation=self.implementation)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (n,), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y

  @staticmethod
  def variables_from_dense(kernel: jax.Array, bias: jax.Array | None, config: VNMConfig | str,
                           *, mask: jax.Array | None = None,
                           permutation: Permutation | None = None, prepare: bool = True,
                           implementation: str | None = None, dtype=None) -> dict[str, dict]:
    """``{"params": ..., "vnm": ...}`` of one VNMDense from a dense kernel (K, N) and bias.

    ``prepare``, ``implementation`` and ``dtype`` must match the VNMDense that will
    read the variables (``dtype``: its ``dtype`` or, when None, its ``param_dtype``).
    """
    weight = compress(kernel, config, mask=mask, permutation=permutation)
    params = {} if bias is None else {"bias": jnp.asarray(bias)}
    index = {"meta": weight.meta, "columns": weight.columns}
    if weight.output_index is not None:
      index["output_index"] = weight.output_index
    if prepare:
      prepared = _prepare_for_layer(weight, implementation, dtype)
      index["layout"] = prepared.layout
      if prepared.values is not None:
        index["values"] = prepared.values
    else:
      params["values"] = weight.values
    return {_LINEN_PARAMS: params, VNM_COLLECTION: index}


def _strip_params(path: str) -> str:
  return path[len(_LINEN_PARAMS) + 1:] if path.startswith(_LINEN_PARAMS + "/") else path


def _by_path(tree, is_leaf) -> dict[str, Any]:
  """Flat {path: leaf} of a tree (None leaves dropped), "params/" prefixes stripped."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {_strip_params(path_str(key_path)): leaf for key_path, leaf in leaves
          if leaf is not None}


def _masks_by_path(masks) -> dict[str, jax.Array]:
  """Flat {path: mask} of a tree_masks-style tree (None = dense) or a flat dict."""
  return _by_path(masks, lambda x: x is None)


def _is_config_leaf(x) -> bool:
  return x is None or isinstance(x, (VNMConfig, str))


def _config_resolver(config):
  """A function path -> VNMConfig from one config, ``{regex: config}`` or a config tree.

  A config tree is what :func:`vnm_jax.trees.tree_configs` returns (the params'
  structure, a VNMConfig or None at each leaf): a mapping with nested mappings or
  None leaves, or an ``nnx.State``. Its paths are matched exactly.
  """
  if isinstance(config, (VNMConfig, str)):
    parsed = VNMConfig.parse(config)
    return lambda path: parsed
  is_tree = isinstance(config, nnx.State) or (
      isinstance(config, Mapping)
      and any(not isinstance(value, (VNMConfig, str)) for value in config.values()))
  if is_tree:
    by_path = {path: VNMConfig.parse(leaf)
               for path, leaf in _by_path(config, _is_config_leaf).items()}

    def from_tree(path):
      if path not in by_path:
        raise ValueError(f"config tree has no VNMConfig for {path!r}; it has one for "
                         f"{sorted(by_path)}.")
      return by_path[path]
    return from_tree
  if isinstance(config, Mapping):
    patterns = {pattern: VNMConfig.parse(value) for pattern, value in config.items()}

    def from_patterns(path):
      for pattern, value in patterns.items():
        if re.search(pattern, path):
          return value
      raise ValueError(f"config has no pattern matching {path!r}; patterns: {list(patterns)}.")
    return from_patterns
  raise TypeError(f"config must be a VNMConfig, a 'V:N:M' string, a {{regex: config}} dict or "
                  f"a config tree (vnm_jax.tree_configs), got {type(config).__name__}.")


def _lookup(mapping, path: str, kind):
  if mapping is None:
    return None
  if isinstance(mapping, Mapping):
    return mapping.get(path)
  raise TypeError(f"{kind} must be a dict keyed by kernel path, got {type(mapping).__name__}.")


def _check_all_found(masks: dict, kernel_paths) -> None:
  missing = sorted(set(masks) - set(kernel_paths))
  if missing:
    raise ValueError(f"masks has entries for {missing}, which are not kernels of "
                     f"nnx.Linear/nn.Dense layers of the model; its kernels are "
                     f"{sorted(kernel_paths)}.")


def _convert_nnx(model: nnx.Module, masks: dict, config_of, permutations, implementation,
                 prepare):
  modules = dict(nnx.iter_modules(model))
  linears = {"/".join(str(p) for p in (*path, "kernel")): path
             for path, module in modules.items() if isinstance(module, nnx.Linear)}
  _check_all_found(masks, linears)
  if () in [linears[kernel_path] for kernel_path in masks]:
    raise ValueError("model is itself an nnx.Linear; use VNMLinear.from_linear.")
  # Resolve every config before changing the model, so that a missing one changes nothing.
  configs = {kernel_path: config_of(kernel_path) for kernel_path in masks}
  for kernel_path, mask in masks.items():
    path = linears[kernel_path]
    layer = VNMLinear.from_linear(modules[path], configs[kernel_path], mask=mask,
                                  permutation=_lookup(permutations, kernel_path, "permutations"),
                                  implementation=implementation, prepare=prepare)
    parent = modules[path[:-1]]
    if isinstance(path[-1], int):
      parent[path[-1]] = layer
    else:
      setattr(parent, path[-1], layer)


def _convert_linen(variables: dict, masks: dict, config_of, permutations, implementation,
                   prepare):
  """Rewrites ``variables`` (a private copy of its dicts) for the VNMDense model."""
  params = variables[_LINEN_PARAMS] if _LINEN_PARAMS in variables else variables
  dense_kernels = {path_str(key_path): leaf
                   for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                   if path_str(key_path).split("/")[-1] == "kernel"}
  _check_all_found(masks, dense_kernels)
  configs = {kernel_path: config_of(kernel_path) for kernel_path in masks}
  index_tree: dict = {}
  for kernel_path, mask in masks.items():
    *scope, _ = kernel_path.split("/")
    kernel = dense_kernels[kernel_path]
    if jnp.ndim(kernel) != 2:
      raise ValueError(f"{kernel_path!r} has shape {jnp.shape(kernel)}; VNMDense takes 2D "
                       f"(in, out) kernels.")
    parent = params
    for name in scope[:-1]:
      parent = parent[name]
    node = parent[scope[-1]]
    dense = VNMDense.variables_from_dense(
        kernel, node.get("bias"), configs[kernel_path], mask=mask,
        permutation=_lookup(permutations, kernel_path, "permutations"), prepare=prepare,
        implementation=implementation)
    kept = {key: value for key, value in node.items() if key not in ("kernel", "bias")}
    parent[scope[-1]] = {**kept, **dense[_LINEN_PARAMS]}
    target = index_tree
    for name in scope:
      target = target.setdefault(name, {})
    target.update(dense[VNM_COLLECTION])
  others = ({key: value for key, value in variables.items() if key != _LINEN_PARAMS}
            if _LINEN_PARAMS in variables else {})
  return {**others, _LINEN_PARAMS: params, VNM_COLLECTION: index_tree}


def _deep_copy_dicts(tree):
  if isinstance(tree, Mapping):
    return {key: _deep_copy_dicts(value) for key, value in tree.items()}
  return tree


def convert_to_vnm(model_or_variables, masks, config, *,
                   permutations: Mapping[str, Permutation] | None = None,
                   implementation: str | None = None, prepare: bool = True):
  """Compresses (and prepares) every masked Dense/Linear kernel of a trained model, in one call.

  Args:
    model_or_variables: an ``nnx.Module`` (changed in place and returned), or a linen
      variables dict (``{"params": ...}``) or bare params dict.
    masks: the V:N:M masks by kernel path, as :func:`vnm_jax.trees.tree_masks` returns
      them (a tree with None at dense leaves; for linen its paths may or may not start
      with "params/") or a flat ``{path: mask}`` dict. Kernels without a mask stay dense.
    config: the VNMConfig of every masked kernel: one VNMConfig (or "V:N:M"), a
      ``{regex: config}`` dict searched in each kernel's path (first match wins), or a
      per-kernel config tree as :func:`vnm_jax.trees.tree_configs` returns it (mixed
      configs, e.g. from a per-layer allocation).
    permutations: ``{kernel path: Permutation}`` for kernels whose masks were computed
      on permuted channels.
    implementation: the layers' ``vnm_matmul`` implementation (None, "pallas", "xla");
      the layouts are prepared for it on the current backend.
    prepare: build inference layers holding the prepared layout (default), or layers
      with trainable values that prepare on the fly (to fine-tune; the variable
      structure of earlier versions).

  Returns:
    nnx: the model, its masked ``nnx.Linear`` modules now :class:`VNMLinear`.
    linen: new variables ``{"params": ..., "vnm": ...}`` for the same model built with
    :class:`VNMDense` (``permuted_outputs=True`` where a permutation had outputs, and
    the same ``implementation`` and ``prepare``) in place of each converted
    ``nn.Dense``; other collections are kept.

  Raises:
    ValueError: a mask matches no Linear/Dense kernel of the model or no config
      (nothing is changed then), a mask is not V:N:M, or a kernel has a zero-size
      dimension.
  """
  check_implementation(implementation)
  masks = _masks_by_path(masks)
  if not masks:
    raise ValueError("masks holds no mask: nothing to convert.")
  config_of = _config_resolver(config)
  if isinstance(model_or_variables, nnx.Module):
    _convert_nnx(model_or_variables, masks, config_of, permutations, implementation, prepare)
    return model_or_variables
  if isinstance(model_or_variables, Mapping):
    return _convert_linen(_deep_copy_dicts(model_or_variables), masks, config_of,
                          permutations, implementation, prepare)
  raise TypeError(f"model_or_variables must be an nnx.Module or a linen variables dict, got "
                  f"{type(model_or_variables).__name__}.")
