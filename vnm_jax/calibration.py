"""Per-input-feature activation norms ||X_j||_2 for Wanda and RIA scores.

:func:`collect_input_norms` runs a Flax model (linen or nnx) on calibration batches
and, for each selected dense layer, sums the squares of its inputs over every token
of every batch, per input feature j; the result is ``sqrt`` of that sum, one (fan_in,)
float32 vector per kernel. For a kernel with several contraction axes (DenseGeneral /
LinearGeneral) fan_in is their flattened size, in the order of
:func:`vnm_jax.masks.as_matrix` (contraction axes in increasing order, row-major),
which is the order Flax lays them out in the kernel.

Recorded layers: linen ``nn.Dense`` and ``nn.DenseGeneral``, nnx ``nnx.Linear`` and
``nnx.LinearGeneral`` (and their subclasses), except general layers with batch axes,
whose kernels are not one (in, out) matrix. Einsum and convolution kernels are not
recorded. A layer called several times (shared weights) accumulates all its inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from vnm_jax.trees import PathFilter, path_predicate, path_str

# The linen collection the interceptor sows squared sums into.
_COLLECTION = "vnm_input_sq_sums"


def _squared_sums(inputs: jax.Array, contraction_axes: tuple[int, ...]) -> jax.Array:
  """(fan_in,) sums of squares of ``inputs`` over all non-contracted axes.

  The contraction axes are moved last in increasing order and flattened row-major,
  matching the kernel's flattened input dims.
  """
  inputs = jnp.asarray(inputs)
  axes = sorted(axis % inputs.ndim for axis in contraction_axes)
  moved = jnp.moveaxis(inputs, axes, list(range(inputs.ndim - len(axes), inputs.ndim)))
  fan_in = math.prod(inputs.shape[axis] for axis in axes)
  flat = moved.reshape(-1, fan_in).astype(jnp.promote_types(inputs.dtype, jnp.float32))
  return jnp.sum(jnp.square(flat), axis=0)


def _as_tuple(axes) -> tuple[int, ...]:
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _linen_contraction_axes(module: nn.Module) -> tuple[int, ...] | None:
  if isinstance(module, nn.DenseGeneral):
    return None if _as_tuple(module.batch_dims) else _as_tuple(module.axis)
  if isinstance(module, nn.Dense):
    return (-1,)
  return None


def _nnx_contraction_axes(module: nnx.Module) -> tuple[int, ...] | None:
  if isinstance(module, nnx.LinearGeneral):
    return None if module.batch_axis else _as_tuple(module.axis)
  if isinstance(module, nnx.Linear):
    return (-1,)
  return None


def _kernel_paths(tree) -> dict[str, Any]:
  """``{path: leaf}`` for the leaves named ``kernel``."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path: leaf for path, leaf in ((path_str(p), leaf) for p, leaf in leaves)
          if path.rsplit("/", 1)[-1] == "kernel"}


def _select(kernels: dict[str, Any], filter: PathFilter | None) -> set[str] | None:
  """The kernel paths ``filter`` selects; None (no filter) means every recordable layer.

  Raises:
    ValueError: a kernel (a selected one, or any without a filter) with a zero-size dim.
  """
  for path, leaf in kernels.items():
    if filter is None or path_predicate(filter)(path, leaf):
      if 0 in tuple(getattr(leaf, "shape", ())):
        raise ValueError(f"kernel {path!r} has a zero-size dimension: shape "
                         f"{tuple(leaf.shape)}; it has no inputs to record.")
  if filter is None:
    return None
  predicate = path_predicate(filter)
  selected = {path for path, leaf in kernels.items() if predicate(path, leaf)}
  if not selected:
    raise ValueError(f"filter={filter!r} selected no kernel; kernel paths are "
                     f"{sorted(kernels)[:8]}.")
  return selected


def _default_call(forward: Callable[..., Any], batch) -> Any:
  return forward(batch)


def _linen_step(model: nn.Module, selected: set[str] | None, call) -> Callable:
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    axes = _linen_contraction_axes(module) if context.method_name == "__call__" else None
    key = "/".join((*module.path, "kernel"))
    if axes is not None and args and (selected is None or key in selected):
      module.sow(_COLLECTION, "kernel", _squared_sums(args[0], axes),
                 init_fn=lambda: 0.0, reduce_fn=jnp.add)
    return next_fun(*args, **kwargs)

  def step(variables, batch):
    recorded = {}

    def forward(*args, **kwargs):
      extra = kwargs.pop("mutable", [])
      extra = [extra] if isinstance(extra, str) else list(extra)
      out, mutated = model.apply(variables, *args, mutable=[*extra, _COLLECTION], **kwargs)
      sums = _kernel_paths(mutated.pop(_COLLECTION, {}))
      for key, value in sums.items():
        recorded[key] = recorded[key] + value if key in recorded else value
      return (out, mutated) if extra else out

    with nn.intercept_methods(interceptor):
      call(forward, batch)
    return recorded

  return jax.jit(step)


class _InputSquaredSum(nnx.Variable):
  """Running sum of squared inputs per input feature, added to a throwaway model copy."""


class _InputCalls(nnx.Variable):
  """How many times a recorded layer ran."""


@functools.lru_cache(maxsize=None)
def _recording_class(layer_class: type) -> type:
  """``layer_class`` whose ``__call__`` first adds its input's squared sums to its stats.

  nnx has no method interceptor, so the copy's recorded layers get this subclass as
  their class; the user's model is never changed.
  """

  class Recording(layer_class):

    def __call__(self, inputs, *args, **kwargs):
      sums = _squared_sums(inputs, _nnx_contraction_axes(self))
      self.vnm_input_sq_sum.set_value(self.vnm_input_sq_sum.get_value() + sums)
      self.vnm_input_calls.set_value(self.vnm_input_calls.get_value() + 1)
      return super().__call__(inputs, *args, **kwargs)

  Recording.__name__ = Recording.__qualname__ = f"InputRecording{layer_class.__name__}"
  return Recording


def _nnx_layers(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{kernel path: layer}`` for the recordable layers of ``model``."""
  return {"/".join(map(str, (*path, "kernel"))): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and _nnx_contraction_axes(node) is not None}


def _nnx_step(model: nnx.Module, selected: set[str] | None, call) -> Callable:
  graphdef, state = nnx.split(model)

  def step(state, batch):
    copy = nnx.merge(graphdef, state)
    layers = {key: layer for key, layer in _nnx_layers(copy).items()
              if selected is None or key in selected}
    for layer in layers.values():
      fan_in = math.prod(layer.kernel.shape[:len(_nnx_contraction_axes(layer))])
      layer.__class__ = _recording_class(type(layer))
      layer.vnm_input_sq_sum = _InputSquaredSum(jnp.zeros((fan_in,), jnp.float32))
      layer.vnm_input_calls = _InputCalls(jnp.zeros((), jnp.int32))
    call(copy, batch)
    return {key: (layer.vnm_input_sq_sum.get_value(), layer.vnm_input_calls.get_value())
            for key, layer in layers.items()}

  jitted = jax.jit(step)

  def run(batch):
    stats = jitted(state, batch)
    return {key: sums for key, (sums, calls) in stats.items() if int(calls) > 0}

  return run


def collect_input_norms(model: nn.Module | nnx.Module, batches: Iterable[Any], *,
                        variables=None, call: Callable[[Callable[..., Any], Any], Any] | None = None,
                        filter: PathFilter | None = None,
                        progress: bool = True) -> dict[str, jax.Array]:
  """L2 norm of each input feature of the model's dense layers over calibration batches.

  Args:
    model: a ``flax.linen`` Module (with ``variables``) or a ``flax.nnx`` Module. Put
      an nnx model in eval mode (``model.eval()``) first if it has dropout; it is run
      on a copy and not modified.
    batches: an iterable of batches (pytrees of arrays), e.g. a list of token arrays.
    variables: the linen model's variables (``{"params": ...}``); not for nnx models.
    call: ``call(forward, batch)`` runs one batch, where ``forward`` is the nnx model
      or, for linen, ``model.apply`` with ``variables`` bound (extra ``mutable=``
      collections come back as ``(out, mutated)`` as usual). Default
      ``forward(batch)``. It is traced with ``jax.jit``.
    filter: which kernels to record, by kernel path (as in the params without the
      linen ``params/`` prefix, e.g. "layers/0/kernel" or "Dense_0/kernel"): a regex
      or a predicate ``(path, kernel) -> bool``. Default: every recordable layer that
      runs. With a filter, every selected kernel must belong to a recordable layer
      that runs, or this raises.
    progress: show a tqdm progress bar over the batches.

  Returns:
    ``{kernel path: norms}``, norms of shape (fan_in,) float32 with
    ``norms[j] = sqrt(sum over all tokens of x_j ** 2)``; pass it as ``input_norms``
    to :func:`vnm_jax.trees.tree_masks` (keys line up with a linen dict, with or without
    its ``params`` level, and with ``nnx.state(model)``).
  """
  if call is None:
    call = _default_call
  elif not callable(call):
    raise TypeError(f"call must be a function (forward, batch) -> output, got {call!r}.")
  if isinstance(model, nn.Module):
    if variables is None or "params" not in variables:
      raise ValueError(f"variables must be the linen model's variables with a 'params' "
                       f"collection, got {type(variables).__name__}"
                       f"{'' if variables is None else ' with keys ' + str(list(variables))}.")
    selected = _select(_kernel_paths(variables["params"]), filter)
    jitted = _linen_step(model, selected, call)
    step = functools.partial(jitted, variables)
  elif isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("variables is only for linen models; an nnx model carries its own "
                       "state, so pass variables=None.")
    selected = _select(_kernel_paths(nnx.state(model)), filter)
    step = _nnx_step(model, selected, call)
  else:
    raise TypeError(f"model must be a flax.linen.Module or a flax.nnx.Module, got "
                    f"{type(model).__name__}.")

  totals: dict[str, jax.Array] = {}
  batch_count = 0
  for batch in tqdm(batches, desc="calibration batches", disable=not progress):
    for key, sums in step(batch).items():
      totals[key] = totals[key] + sums if key in totals else sums
    batch_count += 1
  if batch_count == 0:
    raise ValueError("batches yielded no batch; pass at least one calibration batch.")
  if selected is not None:
    missing = sorted(selected - set(totals))
    if missing:
      raise ValueError(f"no inputs were recorded for kernels {missing} selected by "
                       f"filter={filter!r}: they are not Dense/DenseGeneral (linen) or "
                       f"Linear/LinearGeneral (nnx) layers without batch axes, or `call` never "
                       f"ran them.")
  return {key: jnp.sqrt(sums) for key, sums in totals.items()}
