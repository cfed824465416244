"""Random valid V:N:M weights built in numpy (no compress) and a numpy-loop matmul reference."""

import jax.numpy as jnp
import numpy as np

from vnm_jax import VNMConfig, VNMWeight

# Tolerances relative to the magnitude of the result (max |y|), by dtype.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2,
             jnp.dtype(jnp.float16): 2e-3}


def random_weight(k: int, n: int, config: str, dtype=jnp.float32, *, permuted: bool = False,
                  seed: int = 0) -> VNMWeight:
  """A random valid VNMWeight of shape (k, n), built from its definition in numpy.

  Columns are 4 distinct features of each group, or, with ``permuted``, 4 distinct
  features anywhere in [0, G*M) (as an input permutation makes them) and a random
  output permutation. Some columns point at x's zero padding when k is not a multiple
  of M.
  """
  config = VNMConfig.parse(config)
  v, m = config.v, config.m
  rng = np.random.default_rng(seed)
  groups, row_blocks, half = -(-k // m), -(-n // v), -(-v // 2)
  values = rng.standard_normal((row_blocks, 2, groups, v))
  pairs = np.array([(a, b) for a in range(4) for b in range(a + 1, 4)])
  chosen = pairs[rng.integers(0, len(pairs), (row_blocks, groups, 2 * half))]
  nibbles = (chosen[..., 0] | chosen[..., 1] << 2).astype(np.uint8)
  meta = nibbles[..., :half] | nibbles[..., half:] << 4
  if permuted:
    columns = np.stack([rng.permutation(groups * m)[:4 * groups].reshape(4, groups)
                        for _ in range(row_blocks)])
    output_index = jnp.asarray(rng.permutation(n), jnp.int32)
  else:
    within = np.sort(rng.random((row_blocks, groups, m)).argsort(-1)[..., :4], axis=-1)
    columns = (within + (np.arange(groups) * m)[None, :, None]).transpose(0, 2, 1)
    output_index = None
  return VNMWeight(jnp.asarray(values, jnp.float32).astype(dtype), jnp.asarray(meta),
                   jnp.asarray(columns, jnp.int32), output_index, (k, n), config)


def numpy_decompress(w: VNMWeight) -> np.ndarray:
  """Reads the stored layout element by element, as the format docstring defines it."""
  values, meta, columns = (np.asarray(w.values), np.asarray(w.meta), np.asarray(w.columns))
  r_blocks, _, groups, v = values.shape
  half = -(-v // 2)
  dense = np.zeros((groups * w.config.m, r_blocks * v), values.dtype)
  for r in range(r_blocks):
    for g in range(groups):
      for row in range(v):
        byte = int(meta[r, g, row % half])
        nibble = byte & 0xF if row < half else byte >> 4
        for s, position in enumerate((nibble & 3, nibble >> 2)):
          dense[columns[r, position, g], r * v + row] = values[r, s, g, row]
  dense = dense[:w.shape[0], :w.shape[1]]
  if w.output_index is not None:
    dense = dense[:, np.asarray(w.output_index)]
  return dense


def numpy_matmul(x, w: VNMWeight, *, absolute: bool = False) -> np.ndarray:
  """x @ W with W read off the layout's definition (:func:`numpy_decompress`), float64.

  With ``absolute``, |x| @ |W|: the magnitude a float accumulation's error scales with.
  """
  x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  dense = numpy_decompress(w).astype(np.float64)
  if absolute:
    x, dense = np.abs(x), np.abs(dense)
  return x @ dense


def assert_close(got, expected, magnitude, dtype, factor: float = 1.0):
  """|got - expected| <= tolerance(dtype) * factor * magnitude, elementwise.

  ``magnitude`` is |x| @ |W| (``numpy_matmul(..., absolute=True)``) or another bound on
  the size of the sums, so the tolerance follows the values' scale.
  """
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  assert got.shape == expected.shape, (got.shape, expected.shape)
  bound = TOLERANCE[jnp.dtype(dtype)] * factor * (np.asarray(magnitude, np.float64) + 1e-30)
  excess = np.abs(got - expected) - bound
  assert (excess <= 0).all(), (f"max error {np.abs(got - expected).max():.3g} exceeds the bound "
                               f"at {np.unravel_index(np.argmax(excess), excess.shape)}")
