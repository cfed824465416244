"""The Pallas V:N:M kernel against numpy loops over the stored layout and against dense math.

``TestPallasVNMMatmul`` runs the compiled kernel (GPU only); ``TestPallasVNMMatmulInterpret``
runs the same tests in the Pallas interpreter on any machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typing import NamedTuple

from pallas_kernels import vnm_matmul as kernel_module
from vnm_jax.ops.vnm_matmul.layout import condense
from pallas_kernels.vnm_matmul import (choose_blocks, unsupported_reason, vnm_matmul_pallas,
                                       vnm_matmul_pallas_condensed, vnm_matmul_pallas_packed,
                                       vnm_matmul_reference)

# (tokens, in_features, out_features, config, dtype, permuted, block options)
CASES = [
    pytest.param(7, 73, 100, "32:2:5", jnp.float32, False, {}, id="v32-m5-f32-ragged"),
    pytest.param(1, 64, 64, "64:2:4", jnp.bfloat16, False, {}, id="v64-2to4-bf16-one-token"),
    pytest.param(33, 300, 200, "128:2:8", jnp.float16, True, {}, id="v128-m8-f16-permuted"),
    pytest.param(20, 130, 64, "64:2:16", jnp.float32, True, {}, id="v64-m16-f32-permuted"),
    pytest.param(40, 200, 96, "32:2:8", jnp.bfloat16, False,
                 dict(block_tokens=16, block_groups=16, k_splits=3), id="v32-m8-bf16-split-k"),
    pytest.param(3, 90, 40, "16:2:6", jnp.float32, True, {}, id="v16-m6-f32"),
]

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def numpy_matmul_blocks(x, values, meta, columns, m):
  """y_blocks read off the layout's definition, one stored value at a time (float64)."""
  x, values = np.asarray(x, np.float64), np.asarray(values, np.float64)
  meta, columns = np.asarray(meta), np.asarray(columns)
  row_blocks, _, groups, v = values.shape
  half = meta.shape[-1]
  x_pad = np.zeros((x.shape[0], groups * m))
  x_pad[:, :x.shape[1]] = x
  y = np.zeros((x.shape[0], row_blocks * v))
  for r in range(row_blocks):
    for g in range(groups):
      for row in range(v):
        byte = int(meta[r, g, row % half])
        nibble = byte & 15 if row < half else byte >> 4
        for s, position in enumerate((nibble & 3, nibble >> 2)):
          y[:, r * v + row] += values[r, s, g, row] * x_pad[:, columns[r, position, g]]
  return y


class Layout(NamedTuple):
  values: jax.Array
  meta: jax.Array
  columns: jax.Array
  m: int


def make_problem(tokens, k, n, config, dtype, permuted, seed=0):
  """Random x (tokens, k) and a random valid layout for a (k, n) weight, built in numpy.

  Columns are 4 distinct features of each group (``permuted=False``) or 4 distinct
  features anywhere in [0, G*M) (as an input permutation makes them); some point at
  x's zero padding when k is not a multiple of M.
  """
  v, _, m = (int(part) for part in config.split(":"))
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
  else:
    within = np.sort(rng.random((row_blocks, groups, m)).argsort(-1)[..., :4], axis=-1)
    columns = (within + (np.arange(groups) * m)[None, :, None]).transpose(0, 2, 1)
  layout = Layout(jnp.asarray(values, jnp.float32).astype(dtype), jnp.asarray(meta),
                  jnp.asarray(columns, jnp.int32), m)
  x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32).astype(dtype)
  return x, layout


class TestPallasVNMMatmul:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_gpu(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled Pallas kernel needs a GPU; the interpret subclass runs on CPU")

  def run_kernel(self, x, w, **blocks):
    return vnm_matmul_pallas(x, w.values, w.meta, w.columns, m=w.m,
                             interpret=self.INTERPRET, **blocks)

  @pytest.mark.parametrize("tokens, k, n, config, dtype, permuted, blocks", CASES)
  def test_matches_numpy_loops_and_dense_math(self, tokens, k, n, config, dtype, permuted,
                                              blocks):
    x, w = make_problem(tokens, k, n, config, dtype, permuted)
    y = self.run_kernel(x, w, **blocks)
    r, _, _, v = w.values.shape
    assert y.shape == (tokens, r * v) and y.dtype == dtype
    expected = numpy_matmul_blocks(x, w.values, w.meta, w.columns, w.m)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), expected,
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)
    reference = vnm_matmul_reference(x, w.values, w.meta, w.columns, m=w.m)
    np.testing.assert_allclose(np.asarray(reference, np.float64), expected,
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_packed_and_condensed_kernels(self, dtype):
    x, w = make_problem(19, 150, 128, "64:2:5", dtype, True, seed=4)
    expected = numpy_matmul_blocks(x, w.values, w.meta, w.columns, w.m)
    packed = vnm_matmul_pallas_packed(x, w.values, w.meta, w.columns, m=w.m, block_groups=16,
                                      interpret=self.INTERPRET)
    condensed = vnm_matmul_pallas_condensed(x, condense(w.values, w.meta), w.columns, m=w.m,
                                            k_splits=2, interpret=self.INTERPRET)
    for y in (packed, condensed):
      np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=TOLERANCE[dtype],
                                 atol=TOLERANCE[dtype] * np.abs(expected).max())

  def test_every_output_is_written(self):
    # Ragged tokens and groups (G = 13 is not a multiple of 16): a stale or skipped tile
    # would show up as a wrong row or column.
    x, w = make_problem(21, 100, 64, "32:2:8", jnp.float32, False, seed=3)
    y = np.asarray(self.run_kernel(x, w, block_tokens=16, block_groups=16, k_splits=1))
    expected = numpy_matmul_blocks(x, w.values, w.meta, w.columns, w.m)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.isfinite(y).all()

  def test_bad_inputs_raise(self):
    x, w = make_problem(4, 64, 64, "64:2:8", jnp.float32, False)
    with pytest.raises(TypeError, match="values must have x's dtype"):
      self.run_kernel(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="x has 100 features"):
      self.run_kernel(jnp.zeros((4, 100)), w)
    with pytest.raises(ValueError, match="block_tokens must be a power of 2"):
      self.run_kernel(x, w, block_tokens=24)
    with pytest.raises(ValueError, match="k_splits must be a positive int"):
      self.run_kernel(x, w, k_splits=0)
    _, narrow = make_problem(4, 64, 64, "8:2:8", jnp.float32, False)
    with pytest.raises(ValueError, match="V=8 is not a power of 2 >= 16"):
      self.run_kernel(x, narrow)


class TestPallasVNMMatmulInterpret(TestPallasVNMMatmul):
  INTERPRET = True


def test_unsupported_reason():
  assert unsupported_reason(64, jnp.bfloat16) is None
  assert "V=48" in unsupported_reason(48, jnp.float32)
  assert unsupported_reason(16, jnp.float16) is None
  assert "V=8" in unsupported_reason(8, jnp.float32)
  assert "float64" in unsupported_reason(64, jnp.float64)


def test_choose_blocks_fills_the_gpu_for_decode_shapes():
  block_tokens, block_groups, k_splits = choose_blocks(1, 512, 64)
  assert (block_tokens, block_groups) == (16, 32)
  assert k_splits * 64 >= kernel_module.TARGET_PROGRAMS // 2 and k_splits <= 512 // 32
  assert choose_blocks(4096, 512, 64) == (128, 16, 1)


def test_reference_is_dense_math():
  x, w = make_problem(5, 70, 90, "32:2:7", jnp.float32, True)
  expected = numpy_matmul_blocks(x, w.values, w.meta, w.columns, w.m)
  np.testing.assert_allclose(
      np.asarray(vnm_matmul_reference(x, w.values, w.meta, w.columns, m=w.m)),
      expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["condensed", "packed"])
def test_lowers_to_a_triton_call_for_gpu(kernel):
  # Lowering for CUDA runs on any machine: it catches what the Triton lowering rejects
  # (non-power-of-2 tiles, unsupported indexing) without a GPU.
  x, w = make_problem(40, 300, 128, "64:2:5", jnp.bfloat16, False)
  fn = vnm_matmul_pallas if kernel == "condensed" else vnm_matmul_pallas_packed
  lowered = jax.jit(lambda x, values, meta, columns: fn(x, values, meta, columns, m=w.m)).trace(
      x, w.values, w.meta, w.columns).lower(lowering_platforms=("cuda",))
  assert "__gpu$xla.gpu.triton" in lowered.as_text()
