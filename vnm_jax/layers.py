"""Flax layers that run a compressed V:N:M weight, and converting a trained model to them.

- :class:`VNMLinear` (nnx) and :class:`VNMDense` (linen) compute
  ``vnm_matmul(x, W) + bias`` from a :class:`~vnm_jax.format.VNMWeight`. The stored
  values are trainable parameters (a compressed model can be fine-tuned); the
  integer layout arrays (meta, columns, output_index) are not: in nnx they are
  :class:`VNMIndex` variables, in linen they live in the ``"vnm"`` collection.
- :func:`convert_to_vnm` converts a whole trained model in one call: every dense
  kernel that has a mask is compressed with it. An nnx model has its ``nnx.Linear``
  modules replaced by :class:`VNMLinear` in place; a linen variables dict is turned
  into the variables of the same model built with :class:`VNMDense` in place of
  ``nn.Dense`` (same module names).

Masks are matched to kernels by path (``vnm_jax.trees.path_str``), as
:func:`vnm_jax.trees.tree_masks` produces them: a tree of the params' structure
with None where a kernel stays dense, or a flat ``{path: mask}`` dict.
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
from vnm_jax.matmul import IMPLEMENTATIONS, vnm_matmul
from vnm_jax.permutation import Permutation
from vnm_jax.trees import path_str

VNM_COLLECTION = "vnm"
_LINEN_PARAMS = "params"


class VNMIndex(nnx.Variable):
  """An integer layout array of a VNMWeight (meta, columns, output_index): never trained."""


def _check_implementation(implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")


class VNMLinear(nnx.Module):
  """``y = vnm_matmul(x, W) + bias``: an ``nnx.Linear`` whose kernel is V:N:M-compressed.

  Attributes:
    values: ``nnx.Param`` (R, 2, G, V), the stored kernel values (trainable).
    meta, columns: :class:`VNMIndex`; output_index: :class:`VNMIndex` or None (no
      output permutation).
    bias: ``nnx.Param`` (N,) or None.
    shape: (in_features, out_features); config: the VNMConfig.
    dtype: the computation dtype (x and the values are cast to it), or None for x's.
    implementation: passed to :func:`vnm_jax.vnm_matmul` (None, "pallas" or "xla").
  """

  def __init__(self, weight: VNMWeight, bias: jax.Array | None = None, *, dtype=None,
               implementation: str | None = None):
    if not isinstance(weight, VNMWeight):
      raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}.")
    _check_implementation(implementation)
    if bias is not None and jnp.shape(bias) != (weight.shape[1],):
      raise ValueError(f"bias must have shape ({weight.shape[1]},), got {jnp.shape(bias)}.")
    self.values = nnx.Param(weight.values)
    self.meta = VNMIndex(weight.meta)
    self.columns = VNMIndex(weight.columns)
    self.output_index = (None if weight.output_index is None
                         else VNMIndex(weight.output_index))
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    self.shape = weight.shape
    self.config = weight.config
    self.dtype = dtype
    self.implementation = implementation

  @classmethod
  def from_linear(cls, linear: nnx.Linear, config: VNMConfig | str, *,
                  mask: jax.Array | None = None, permutation: Permutation | None = None,
                  implementation: str | None = None) -> VNMLinear:
    """Compresses a trained ``nnx.Linear`` with its V:N:M ``mask`` (None: computed by magnitude).

    ``mask`` must be V:N:M (after ``permutation``, if given); see
    :func:`vnm_jax.format.compress`. The layer keeps the Linear's bias and dtype.
    """
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"linear must be an nnx.Linear, got {type(linear).__name__}.")
    weight = compress(linear.kernel[...], config, mask=mask, permutation=permutation)
    bias = None if linear.bias is None else linear.bias[...]
    return cls(weight, bias, dtype=linear.dtype, implementation=implementation)

  @property
  def weight(self) -> VNMWeight:
    """The layer's kernel as a :class:`VNMWeight`."""
    output_index = None if self.output_index is None else self.output_index[...]
    return VNMWeight(self.values[...], self.meta[...], self.columns[...], output_index,
                     self.shape, self.config)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., out_features)."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y = vnm_matmul(x, self.weight, implementation=self.implementation)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


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

  Variables: ``params`` {"values" (R, 2, G, V), "bias" (N,)} and the ``"vnm"``
  collection {"meta", "columns", and "output_index" when ``permuted_outputs``}.
  ``init`` creates zero values on a valid placeholder layout; the real ones come
  from :func:`convert_to_vnm` (or :meth:`variables_from_dense`).

  Attributes:
    features: out_features N.
    in_features: K (the compressed kernel's rows; the layer cannot infer it from x
      before it has weights).
    config: the VNMConfig (or "V:N:M").
    use_bias: whether there is a bias.
    permuted_outputs: whether the weight stores an output permutation.
    dtype: computation dtype, or None for x's.
    param_dtype: dtype of values and bias at init.
    implementation: passed to :func:`vnm_jax.vnm_matmul`.
  """

  features: int
  in_features: int
  config: VNMConfig | str
  use_bias: bool = True
  permuted_outputs: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in_features) -> (..., features)."""
    config = VNMConfig.parse(self.config)
    _check_implementation(self.implementation)
    k, n = self.in_features, self.features
    groups, row_blocks = -(-k // config.m), -(-n // config.v)
    values = self.param("values", nn.initializers.zeros_init(),
                        (row_blocks, 2, groups, config.v), self.param_dtype)
    layout = _default_layout(k, n, config)
    meta = self.variable(VNM_COLLECTION, "meta", lambda: jnp.asarray(layout["meta"]))
    columns = self.variable(VNM_COLLECTION, "columns", lambda: jnp.asarray(layout["columns"]))
    output_index = None
    if self.permuted_outputs:
      output_index = self.variable(VNM_COLLECTION, "output_index",
                                   lambda: jnp.arange(n, dtype=jnp.int32)).value
    weight = VNMWeight(values, meta.value, columns.value, output_index, (k, n), config)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y = vnm_matmul(x, weight, implementation=self.implementation)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (n,), self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y

  @staticmethod
  def variables_from_dense(kernel: jax.Array, bias: jax.Array | None, config: VNMConfig | str,
                           *, mask: jax.Array | None = None,
                           permutation: Permutation | None = None) -> dict[str, dict]:
    """``{"params": ..., "vnm": ...}`` of one VNMDense from a dense kernel (K, N) and bias."""
    weight = compress(kernel, config, mask=mask, permutation=permutation)
    params = {"values": weight.values}
    if bias is not None:
      params["bias"] = jnp.asarray(bias)
    index = {"meta": weight.meta, "columns": weight.columns}
    if weight.output_index is not None:
      index["output_index"] = weight.output_index
    return {_LINEN_PARAMS: params, VNM_COLLECTION: index}


def _masks_by_path(masks) -> dict[str, jax.Array]:
  """Flat {path: mask} of a tree_masks-style tree (None = dense) or a flat dict."""
  leaves = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  found = {}
  for key_path, leaf in leaves:
    if leaf is None:
      continue
    path = path_str(key_path)
    found[path[len(_LINEN_PARAMS) + 1:] if path.startswith(_LINEN_PARAMS + "/") else path] = leaf
  return found


def _config_for(config, path: str) -> VNMConfig:
  """The config of a kernel: one config for all, or the first matching ``{regex: config}``."""
  if isinstance(config, Mapping):
    for pattern, value in config.items():
      if re.search(pattern, path):
        return VNMConfig.parse(value)
    raise ValueError(f"config has no pattern matching {path!r}; patterns: {list(config)}.")
  return VNMConfig.parse(config)


def _lookup(mapping, path: str, kind):
  if mapping is None:
    return None
  if isinstance(mapping, Mapping):
    return mapping.get(path)
  raise TypeError(f"{kind} must be a dict keyed by kernel path, got {type(mapping).__name__}.")


def _convert_nnx(model: nnx.Module, masks: dict, config, permutations, implementation):
  modules = dict(nnx.iter_modules(model))
  linears = {"/".join(str(p) for p in (*path, "kernel")): path
             for path, module in modules.items() if isinstance(module, nnx.Linear)}
  _check_all_found(masks, linears)
  if () in [linears[kernel_path] for kernel_path in masks]:
    raise ValueError("model is itself an nnx.Linear; use VNMLinear.from_linear.")
  for kernel_path, mask in masks.items():
    path = linears[kernel_path]
    layer = VNMLinear.from_linear(modules[path], _config_for(config, kernel_path), mask=mask,
                                  permutation=_lookup(permutations, kernel_path, "permutations"),
                                  implementation=implementation)
    parent = modules[path[:-1]]
    if isinstance(path[-1], int):
      parent[path[-1]] = layer
    else:
      setattr(parent, path[-1], layer)


def _check_all_found(masks: dict, kernel_paths) -> None:
  missing = sorted(set(masks) - set(kernel_paths))
  if missing:
    raise ValueError(f"masks has entries for {missing}, which are not kernels of "
                     f"nnx.Linear/nn.Dense layers of the model; its kernels are "
                     f"{sorted(kernel_paths)}.")


def _convert_linen(variables: dict, masks: dict, config, permutations):
  """Rewrites ``variables`` (a private copy of its dicts) for the VNMDense model."""
  params = variables[_LINEN_PARAMS] if _LINEN_PARAMS in variables else variables
  dense_kernels = {path_str(key_path): leaf
                   for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                   if path_str(key_path).split("/")[-1] == "kernel"}
  _check_all_found(masks, dense_kernels)
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
        kernel, node.get("bias"), _config_for(config, kernel_path), mask=mask,
        permutation=_lookup(permutations, kernel_path, "permutations"))
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


def convert_to_vnm(model_or_variables, masks, config: VNMConfig | str | Mapping[str, Any], *,
                   permutations: Mapping[str, Permutation] | None = None,
                   implementation: str | None = None):
  """Compresses every masked Dense/Linear kernel of a trained model, in one call.

  Args:
    model_or_variables: an ``nnx.Module`` (changed in place and returned), or a linen
      variables dict (``{"params": ...}``) or bare params dict.
    masks: the V:N:M masks by kernel path, as :func:`vnm_jax.trees.tree_masks` returns
      them (a tree with None at dense leaves; for linen its paths may or may not start
      with "params/") or a flat ``{path: mask}`` dict. Kernels without a mask stay dense.
    config: the VNMConfig (or "V:N:M") of every masked kernel, or ``{regex: config}``
      searched in each kernel's path (first match wins).
    permutations: ``{kernel path: Permutation}`` for kernels whose masks were computed
      on permuted channels.
    implementation: the VNMLinear layers' ``vnm_matmul`` implementation (nnx only; a
      linen model sets it on its VNMDense modules).

  Returns:
    nnx: the model, its masked ``nnx.Linear`` modules now :class:`VNMLinear`.
    linen: new variables ``{"params": ..., "vnm": ...}`` for the same model built with
    :class:`VNMDense` (``permuted_outputs=True`` where a permutation had outputs) in
    place of each converted ``nn.Dense``: kernels became "values", the layout arrays
    are in the "vnm" collection; other collections are kept.

  Raises:
    ValueError: a mask matches no Linear/Dense kernel of the model (nothing is changed
      then), or is not V:N:M.
  """
  _check_implementation(implementation)
  masks = _masks_by_path(masks)
  if not masks:
    raise ValueError("masks holds no mask: nothing to convert.")
  if isinstance(model_or_variables, nnx.Module):
    _convert_nnx(model_or_variables, masks, config, permutations, implementation)
    return model_or_variables
  if isinstance(model_or_variables, Mapping):
    return _convert_linen(_deep_copy_dicts(model_or_variables), masks, config, permutations)
  raise TypeError(f"model_or_variables must be an nnx.Module or a linen variables dict, got "
                  f"{type(model_or_variables).__name__}.")
