"""Shared helpers for the Pallas kernel tests (tests/test_pallas_decode.py, test_pallas_prefill.py).

Problems come two ways: a random kernel compressed with ``vnm_jax.compress`` (optionally
with input and output permutations), checked against ``x @ decompress(w)``; and a random
layout drawn directly (columns anywhere in [0, G*M), some in x's zero padding), checked
against the layout's definition. Tolerances scale with the accumulation's magnitude,
``|x| @ |W|`` per output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnm_jax import Permutation, compress, decompress
from vnm_jax.config import VNMConfig

# Relative to |x| @ |W|: float32 accumulation at full precision (~K eps32), or one
# rounding of the output to 16 bits (bf16 2^-8, f16 2^-11), with room for summation order.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 8e-3,
             jnp.dtype(jnp.float16): 2e-3}

needs_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="compiled Pallas Triton kernels need a CUDA GPU; the *Interpret subclass runs the "
           "same tests in the Pallas interpreter on CPU")


def _random(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


@functools.lru_cache(maxsize=None)
def _compressed_weight(k: int, n: int, config: str, dtype_name: str, permuted: bool, seed: int):
  # Cached: compress and decompress compile per shape, and both kernels' tests use the
  # same weights.
  rng = np.random.default_rng(seed)
  permutation = (Permutation(inputs=rng.permutation(k), outputs=rng.permutation(n))
                 if permuted else None)
  w = compress(_random(rng, (k, n), jnp.dtype(dtype_name)), config, permutation=permutation)
  return w, np.asarray(decompress(w), np.float64)


def compressed_problem(tokens: int, k: int, n: int, config: str, dtype, permuted: bool,
                       seed: int = 0):
  """x (tokens, k) and a VNMWeight of a random (k, n) kernel; dense (k, n) float64 kernel.

  Returns (x, w, dense) where ``dense = decompress(w)`` (output permutation undone).
  """
  w, dense = _compressed_weight(k, n, config, jnp.dtype(dtype).name, permuted, seed)
  x = _random(np.random.default_rng(seed + 1000 + tokens), (tokens, k), dtype)
  return x, w, dense


def blocks_to_outputs(y_blocks, w) -> np.ndarray:
  """(T, R*V) outputs in row-block order -> (T, N) in the kernel's output order."""
  y = np.asarray(y_blocks, np.float64)
  if w.output_index is not None:
    return y[:, np.asarray(w.output_index)]
  return y[:, :w.shape[1]]


def random_layout(k: int, n: int, config: str, dtype, seed: int = 0):
  """Stored (values, meta, columns) drawn at random, not by compress.

  Every row keeps 2 of its group's 4 columns; columns are 4 distinct features anywhere
  in [0, G*M) per row block (an arbitrary input order), so some point into x's zero
  padding when k is not a multiple of M. Returns (values, meta, columns, m).
  """
  cfg = VNMConfig.parse(config)
  v, m = cfg.v, cfg.m
  rng = np.random.default_rng(seed)
  groups, row_blocks, half = -(-k // m), -(-n // v), -(-v // 2)
  values = _random(rng, (row_blocks, 2, groups, v), dtype)
  pairs = np.array([(a, b) for a in range(4) for b in range(a + 1, 4)])
  chosen = pairs[rng.integers(0, len(pairs), (row_blocks, groups, 2 * half))]
  nibbles = (chosen[..., 0] | chosen[..., 1] << 2).astype(np.uint8)
  meta = nibbles[..., :half] | nibbles[..., half:] << 4
  columns = np.stack([rng.permutation(groups * m)[:4 * groups].reshape(4, groups)
                      for _ in range(row_blocks)]).astype(np.int32)
  return values, jnp.asarray(meta), jnp.asarray(columns), m


def layout_dense(values, meta, columns, m: int) -> np.ndarray:
  """The dense (G*M, R*V) float64 matrix of a stored layout, read off its definition."""
  values, meta, columns = (np.asarray(a) for a in (values, meta, columns))
  values = values.astype(np.float64)
  row_blocks, _, groups, v = values.shape
  nibbles = np.concatenate([meta & 15, meta >> 4], axis=-1)[..., :v].astype(np.int64)
  dense = np.zeros((groups * m, row_blocks * v))
  for s, pos in enumerate((nibbles & 3, nibbles >> 2)):  # (R, G, V) each
    inputs = np.take_along_axis(columns.transpose(0, 2, 1), pos, axis=-1)  # (R, G, V)
    outputs = np.broadcast_to(np.arange(row_blocks * v).reshape(row_blocks, 1, v), inputs.shape)
    np.add.at(dense, (inputs, outputs), values[:, s])
  return dense


def assert_close(actual, expected, x, dense, dtype, what: str) -> None:
  """|actual - expected| <= tol(dtype) * (|x| @ |dense|), elementwise; no NaN passes."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  x = np.abs(np.asarray(x, np.float64))
  scale = x @ np.abs(dense[:x.shape[1]])
  scale = scale[:, :actual.shape[1]] + np.finfo(np.float32).tiny
  error = np.abs(actual - expected)
  assert np.isfinite(actual).all(), f"{what}: non-finite outputs (unwritten?)"
  worst = (error / scale).max()
  assert worst <= TOLERANCE[jnp.dtype(dtype)], f"{what}: error {worst:.2e} of |x| @ |W|"


def inner_equations(fn, *args):
  """Primitive names of the equations inside a jitted function's jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  (eqn,) = jaxpr.eqns  # the jit call
  return [e.primitive.name for e in eqn.params["jaxpr"].jaxpr.eqns]


def cuda_lowering_unavailable() -> str | None:
  """Why this jaxlib cannot lower a Pallas Triton call for CUDA here, or None."""
  try:
    from jax._src.lib import triton  # noqa: F401
    from jax._src.pallas.triton import pallas_call_registration  # noqa: F401
  except ImportError as error:
    return f"this jaxlib has no Triton lowering ({error})"
  return None


def lower_for_cuda(fn, *shape_structs) -> str:
  """StableHLO text of ``fn`` lowered for CUDA on any machine (runs the Triton lowering)."""
  lowered = jax.jit(fn).trace(*shape_structs).lower(lowering_platforms=("cuda",))
  return lowered.as_text()


def stored_structs(k: int, n: int, v: int, m: int, dtype):
  """ShapeDtypeStructs of the stored (values, meta, columns) of a (k, n) weight."""
  groups, row_blocks = -(-k // m), -(-n // v)
  return (jax.ShapeDtypeStruct((row_blocks, 2, groups, v), dtype),
          jax.ShapeDtypeStruct((row_blocks, groups, -(-v // 2)), jnp.uint8),
          jax.ShapeDtypeStruct((row_blocks, 4, groups), jnp.int32))


def prepared_structs(prepare, k, n, v, m, dtype, **prepare_kwargs):
  """The layout's ShapeDtypeStructs, from ``prepare`` traced abstractly (nothing computed)."""
  return jax.eval_shape(functools.partial(prepare, m=m, **prepare_kwargs),
                        *stored_structs(k, n, v, m, dtype))
