"""Timing a V:N:M matmul against the dense matmul it replaces, in the same run.

:func:`measure_matmul_speedup` is what V/M selection and ``vnm-jax demo`` call to learn
the speedup of a (K, N, tokens, config) on the device at hand; ``bench/kernel.py``
sweeps it over the shapes of real models. It times the path a converted model runs:
the weight prepared once (:func:`vnm_jax.prepare`), then ``vnm_matmul`` jitted. Times
are medians of repeated runs after warm-up, each run ended by ``block_until_ready``;
dense and V:N:M runs alternate so that a change in machine load hits both alike.

Beside each speedup, the physics: ``bytes_limit`` (dense weight bytes over the bytes
the V:N:M kernel reads per call: the bound where reading the weight dominates, at
decode sizes) and ``flops_limit`` (dense multiply-adds over the kernel's: M/4 for the
condensed formulations, the bound where compute dominates, at prefill sizes).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vnm_jax.config import KEPT_COLUMNS, VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.ops.vnm_matmul import dispatch
from vnm_jax.ops.vnm_matmul.api import vnm_matmul
from vnm_jax.ops.vnm_matmul.prepared import IMPLEMENTATIONS, PreparedVNMWeight, prepare

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
    kernel: the formulation the dispatch table picked ("batched"/"blocks" for XLA,
      "decode"/"prefill" for Pallas).
    device: the device kind the times were taken on.
    dense_seconds: median time of ``jnp.dot(x, W)`` with the dense W.
    vnm_seconds: median time of ``vnm_matmul(x, prepare(compress(W)))``.
    speedup: dense_seconds / vnm_seconds.
    max_abs_error: max |vnm - dense math| where dense math is x @ decompress(w) in float32
      at highest precision.
    max_rel_error: max_abs_error / max |dense math|.
    weight_bytes: bytes the compressed weight stores (values + meta + columns +
      output_index): what a checkpoint holds.
    dense_weight_bytes: bytes of the dense (K, N) weight in ``dtype``.
    resident_bytes: bytes the prepared weight holds on the device (stored + layout).
    bytes_limit: dense_weight_bytes / the bytes the kernel reads per call.
    flops_limit: dense multiply-adds / the kernel's.
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
  kernel: str = ""
  resident_bytes: int = 0
  bytes_limit: float = 0.0
  flops_limit: float = 0.0

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


def kernel_limits(prepared: PreparedVNMWeight, tokens: int) -> dict:
  """The kernel a call of ``tokens`` rows runs on ``prepared``, and its physical limits.

  Returns {"kernel", "bytes_read", "bytes_limit", "flops_limit"}: the bytes of the
  prepared arrays that kernel reads per call, dense weight bytes over them, and dense
  multiply-adds over the kernel's (M/4: every formulation runs dense dots on the
  4 kept columns of each group).
  """
  layout = prepared.layout
  if prepared.implementation == "xla":
    rows = layout.columns.shape[0] * layout.columns.shape[1]  # R * 4G
    kernel, arrays = dispatch.choose_xla(tokens, rows).formulation, layout
  else:
    kernel = dispatch.choose_pallas(tokens, prepared.config)
    if kernel == "prefill" and layout.prefill is None:
      kernel = "decode"
    arrays = layout.prefill if kernel == "prefill" else layout.decode
  bytes_read = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(arrays))
  return dict(kernel=kernel, bytes_read=bytes_read,
              bytes_limit=prepared.dense_nbytes / bytes_read,
              flops_limit=prepared.config.m / KEPT_COLUMNS)


def measure_matmul_speedup(in_features: int, out_features: int, tokens: int,
                           config: VNMConfig | str, *, dtype=jnp.float32,
                           implementation: str | None = None, repeats: int = 10,
                           calls_per_run: int | None = None, seed: int = 0,
                           weight: VNMWeight | None = None) -> MatmulTiming:
  """Times ``vnm_matmul`` on a prepared weight against the dense ``jnp.dot``, in the same run.

  A random normal (K, N) kernel is pruned and compressed with the default
  ``column_l1`` rule (or ``weight`` is used as given), then prepared once for the
  implementation in ``dtype`` (:func:`vnm_jax.prepare`, as ``convert_to_vnm`` does);
  x is random normal (tokens, K). Both matmuls are jitted; preparation is not timed.

  Args:
    in_features, out_features: K and N of the weight.
    tokens: rows of x (1 for a decode step).
    config: V:N:M config or "V:N:M" string.
    dtype: float32, bfloat16 or float16, for x and the weight.
    implementation: None, "pallas" or "xla", passed to :func:`vnm_jax.prepare`.
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
  prepared = prepare(weight, implementation=implementation, dtype=dtype)
  xs = [jax.random.normal(key, (t, k), jnp.float32).astype(dtype)
        for key in jax.random.split(key_x, calls_per_run)]

  dense = jax.jit(lambda xs, w: [jnp.dot(x, w) for x in xs])
  sparse = jax.jit(lambda xs, w: [vnm_matmul(x, w) for x in xs])

  exact = jnp.dot(xs[0].astype(jnp.float32), decompress(weight).astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  error = jnp.abs(sparse(xs, prepared)[0].astype(jnp.float32) - exact)
  max_abs_error = float(jnp.max(error))
  max_rel_error = max_abs_error / max(float(jnp.max(jnp.abs(exact))), 1e-30)

  times = time_calls({"dense": lambda: dense(xs, kernel), "vnm": lambda: sparse(xs, prepared)},
                     repeats=repeats)
  dense_seconds = times["dense"] / calls_per_run
  vnm_seconds = times["vnm"] / calls_per_run
  limits = kernel_limits(prepared, t)
  return MatmulTiming(
      in_features=k, out_features=n, tokens=t, config=str(config), dtype=dtype.name,
      implementation=prepared.implementation, device=jax.devices()[0].device_kind,
      dense_seconds=dense_seconds, vnm_seconds=vnm_seconds,
      speedup=dense_seconds / vnm_seconds, max_abs_error=max_abs_error,
      max_rel_error=max_rel_error, weight_bytes=weight.nbytes,
      dense_weight_bytes=weight.dense_nbytes, kernel=limits["kernel"],
      resident_bytes=prepared.nbytes, bytes_limit=limits["bytes_limit"],
      flops_limit=limits["flops_limit"])
