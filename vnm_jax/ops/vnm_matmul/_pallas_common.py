"""What the Pallas decode and prefill kernels share: their limits and argument checks."""

from __future__ import annotations

import jax.numpy as jnp

from vnm_jax.ops.vnm_matmul.layout import KEPT_COLUMNS

SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
MIN_BLOCK = 16  # Triton's smallest dot dimension (and power-of-2 tiles throughout)


def is_power_of_2(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(v: int, m: int, dtype) -> str | None:
  """Why a Triton kernel cannot take V, M and dtype, or None."""
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not one of float32, bfloat16, float16"
  if not is_power_of_2(v) or v < MIN_BLOCK:
    return (f"V={v} is not a power of 2 >= {MIN_BLOCK} (Triton needs power-of-2 tiles and "
            f"dots of width >= {MIN_BLOCK})")
  if isinstance(m, bool) or not isinstance(m, int) or m < KEPT_COLUMNS:
    return f"M={m} is not an int >= {KEPT_COLUMNS}"
  return None


def check_stored(values, meta, columns, m, kernel: str) -> None:
  """Raises ValueError/TypeError naming the argument unless the stored arrays fit a kernel."""
  if values.ndim != 4 or values.shape[1] != 2:
    raise ValueError(f"values must have shape (R, 2, G, V), got {values.shape}.")
  r, _, g, v = values.shape
  if jnp.dtype(values.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"values must be float32, bfloat16 or float16, got {values.dtype}.")
  if meta.shape != (r, g, -(-v // 2)) or meta.dtype != jnp.uint8:
    raise ValueError(f"meta must be uint8 of shape {(r, g, -(-v // 2))}, got {meta.dtype} "
                     f"{meta.shape}.")
  if columns.shape != (r, KEPT_COLUMNS, g) or columns.dtype != jnp.int32:
    raise ValueError(f"columns must be int32 of shape {(r, KEPT_COLUMNS, g)}, got "
                     f"{columns.dtype} {columns.shape}.")
  reason = unsupported_reason(v, m, values.dtype)
  if reason is not None:
    raise ValueError(f"the {kernel} kernel cannot take this weight: {reason}.")


def check_x(x, m) -> None:
  """Raises ValueError/TypeError naming the argument unless x (T, K) and m can be used."""
  if x.ndim != 2:
    raise ValueError(f"x must be 2D (tokens, in_features), got shape {x.shape}.")
  if x.shape[0] < 1:
    raise ValueError(f"x must have at least one token, got shape {x.shape}.")
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}.")
  if isinstance(m, bool) or not isinstance(m, int) or m < KEPT_COLUMNS:
    raise ValueError(f"m must be an int >= {KEPT_COLUMNS}, got {m!r}.")
