"""Timing a V:N:M matmul against the dense matmul it replaces, in the same run.

:func:`measure_matmul_speedup` is what V/M selection calls to learn the speedup of a
(K, N, tokens, config) on the device at hand; ``bench/kernel.py`` sweeps it over the
shapes of real models. Times are medians of repeated runs after warm-up, each run
ended by ``block_until_ready``; dense and V:N:M runs alternate so that a change in
machine load hits both alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.matmul import IMPLEMENTATIONS, resolve_implementation, vnm_matmul

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MatmulTiming:
  """One dense-vs-V:N:M measurement of ``y = x @ W`` for x (tokens, K), W (K, N).

  Attributes:
    in_features, out_features: K and N of the weight.
    tokens: rows of x.
    config: the V:N:M config, as "V:N:M".
    dtype: x's and W's dtype name ("float32", "bfloat16", "float16").
    implementation: the V:N:M path that ran ("pallas" or "xla"; after any fallback).
    device: the device kind the times were taken on.
    dense_seconds: median time of ``jnp.dot(x, W)`` with the dense W.
    vnm_seconds: median time of ``vnm_matmul(x, compress(W))``.
    speedup: dense_seconds / vnm_seconds.
    max_abs_error: max |vnm - dense math| where dense math is x @ decompress(w) in float32
      at highest precision.
    max_rel_error: max_abs_error / max |dense math|.
    weight_bytes: bytes the compressed weight stores (values + meta + columns + output_index).
    dense_weight_bytes: bytes of the dense (K, N) weight in ``dtype``.
  """

  in_features: int
  out_features: int
  tokens: int
  config: str
  dtype: str
  implementation: str
  device: str
  dense_seconds: float
  vnm_seconds: float
  speedup: float
  max_abs_error: float
  max_rel_error: float
  weight_bytes: int
  dense_weight_bytes: int

  @property
  def bytes_ratio(self) -> float:
    """weight_bytes / dense_weight_bytes."""
    return self.weight_bytes / self.dense_weight_bytes

  def as_dict(self) -> dict:
    """A JSON-ready dict of the fields plus ``bytes_ratio``."""
    return {**dataclasses.asdict(self), "bytes_ratio": self.bytes_ratio}


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def time_calls(fns: dict[str, Callable[[], object]], *, repeats: int,
               warmup: int = 2) -> dict[str, float]:
  """Median wall time of each no-argument function, runs of the functions interleaved.

  Each function is called ``warmup`` times first (compilation), then the functions
  take turns ``repeats`` times; every call is ended by ``jax.block_until_ready``.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in samples.items()}


def measure_matmul_speedup(in_features: int, out_features: int, tokens: int,
                           config: VNMConfig | str, *, dtype=jnp.float32,
                           implementation: str | None = None, repeats: int = 10,
                           calls_per_run: int | None = None, seed: int = 0,
                           weight: VNMWeight | None = None) -> MatmulTiming:
  """Times ``vnm_matmul`` against the dense ``jnp.dot`` it replaces, in the same run.

  A random normal (K, N) kernel is pruned and compressed with the default
  ``column_l1`` rule (or ``weight`` is used as given); x is random normal
  (tokens, K). Both matmuls are jitted.

  Args:
    in_features, out_features: K and N of the weight.
    tokens: rows of x (1 for a decode step).
    config: V:N:M config or "V:N:M" string.
    dtype: float32, bfloat16 or float16, for x and the weight.
    implementation: None, "pallas" or "xla", passed to :func:`vnm_jax.vnm_matmul`.
    repeats: timed runs of each matmul; the median is reported.
    calls_per_run: matmuls per timed run, each on its own x, inside one jitted call
      so that per-call dispatch does not dominate small shapes; default 16 on GPU, 1
      elsewhere. Reported times are per matmul.
    seed: seeds the kernel and x.
    weight: an already compressed weight of shape (K, N) to time instead of a random one.

  Returns:
    A :class:`MatmulTiming`.
  """
  k = _check_positive_int("in_features", in_features)
  n = _check_positive_int("out_features", out_features)
  t = _check_positive_int("tokens", tokens)
  repeats = _check_positive_int("repeats", repeats)
  config = VNMConfig.parse(config)
  dtype = jnp.dtype(dtype)
  if dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if calls_per_run is None:
    calls_per_run = 16 if jax.default_backend() == "gpu" else 1
  calls_per_run = _check_positive_int("calls_per_run", calls_per_run)

  key_w, key_x = jax.random.split(jax.random.key(seed))
  if weight is None:
    kernel = jax.random.normal(key_w, (k, n), jnp.float32).astype(dtype)
    weight = compress(kernel, config)
  else:
    if weight.shape != (k, n) or weight.config != config:
      raise ValueError(f"weight must have shape {(k, n)} and config {config}, got "
                       f"{weight.shape} and {weight.config}.")
    weight = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                          else a, weight)
    kernel = decompress(weight)
  xs = [jax.random.normal(key, (t, k), jnp.float32).astype(dtype)
        for key in jax.random.split(key_x, calls_per_run)]

  dense = jax.jit(lambda xs, w: [jnp.dot(x, w) for x in xs])
  used = resolve_implementation(implementation, weight, dtype)
  sparse = jax.jit(lambda xs, w: [vnm_matmul(x, w, implementation=used) for x in xs])

  exact = jnp.dot(xs[0].astype(jnp.float32), decompress(weight).astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  error = jnp.abs(sparse(xs, weight)[0].astype(jnp.float32) - exact)
  max_abs_error = float(jnp.max(error))
  max_rel_error = max_abs_error / max(float(jnp.max(jnp.abs(exact))), 1e-30)

  times = time_calls({"dense": lambda: dense(xs, kernel), "vnm": lambda: sparse(xs, weight)},
                     repeats=repeats)
  dense_seconds = times["dense"] / calls_per_run
  vnm_seconds = times["vnm"] / calls_per_run
  return MatmulTiming(
      in_features=k, out_features=n, tokens=t, config=str(config), dtype=dtype.name,
      implementation=used, device=jax.devices()[0].device_kind,
      dense_seconds=dense_seconds, vnm_seconds=vnm_seconds,
      speedup=dense_seconds / vnm_seconds, max_abs_error=max_abs_error,
      max_rel_error=max_rel_error, weight_bytes=weight.nbytes,
      dense_weight_bytes=weight.dense_nbytes)
