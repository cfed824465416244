"""The Pallas prefill kernel against its reference and dense math.

``TestPrefill`` runs the compiled kernel (GPU only); ``TestPrefillInterpret`` runs the same
tests in the Pallas interpreter on any machine; ``TestPrefillCudaLowering`` lowers the
kernel for CUDA (the Triton lowering, no GPU needed) at the benchmark's shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernel_testing import (assert_close, blocks_to_outputs, compressed_problem,
                                   cuda_lowering_unavailable, inner_equations, layout_dense,
                                   lower_for_cuda, needs_gpu, prepared_structs, random_layout)
from vnm_jax.ops.vnm_matmul import pallas_prefill as prefill

# (tokens, in, out, config, dtype, permuted, prepare options, call options); the weights
# are those of tests/test_pallas_decode.py (compressed once for both).
CASES = [
    pytest.param(1, 73, 100, "32:2:5", jnp.float32, False, {}, {}, id="v32-m5-f32-one-token"),
    pytest.param(40, 300, 64, "64:2:8", jnp.bfloat16, True, dict(block_groups=4),
                 dict(block_tokens=16), id="v64-m8-bf16-permuted-3-tiles-10-steps"),
    pytest.param(20, 130, 70, "16:2:4", jnp.float16, True, dict(block_groups=8), {},
                 id="v16-2to4-f16-permuted"),
    pytest.param(33, 200, 128, "128:2:8", jnp.bfloat16, False, {}, dict(block_tokens=32),
                 id="v128-m8-bf16-2-tiles"),
    pytest.param(17, 100, 96, "32:2:16", jnp.float32, True, {}, {}, id="v32-m16-f32-permuted"),
    pytest.param(50, 96, 64, "64:2:6", jnp.bfloat16, False, dict(block_groups=4),
                 dict(block_tokens=64, num_warps=4), id="v64-m6-bf16-one-ragged-tile"),
]


class TestPrefill:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip(needs_gpu.kwargs["reason"])

  def matmul(self, x, layout, m, **kwargs):
    return prefill.matmul(x, layout, m=m, interpret=self.INTERPRET, **kwargs)

  @pytest.mark.parametrize("tokens, k, n, config, dtype, permuted, prep, call", CASES)
  def test_matches_reference_and_dense_math(self, tokens, k, n, config, dtype, permuted, prep,
                                            call):
    x, w, dense = compressed_problem(tokens, k, n, config, dtype, permuted)
    layout = prefill.prepare(w.values, w.meta, w.columns, m=w.config.m, **prep)
    y = self.matmul(x, layout, w.config.m, **call)
    r, v = w.values.shape[0], w.config.v
    assert y.shape == (tokens, r * v) and y.dtype == dtype
    block_dense = layout_dense(w.values, w.meta, w.columns, w.config.m)
    assert_close(y, prefill.reference(x, layout, m=w.config.m), x, block_dense, dtype,
                 "vs reference")
    assert_close(blocks_to_outputs(y, w), np.asarray(x, np.float64) @ dense, x, np.abs(dense),
                 dtype, "vs x @ decompress(w)")

  @pytest.mark.parametrize("tokens", [1, 18])
  def test_arbitrary_columns_and_zero_padding(self, tokens):
    values, meta, columns, m = random_layout(45, 48, "16:2:8", jnp.float32, seed=tokens)
    assert (np.asarray(columns) >= 45).any()
    layout = prefill.prepare(values, meta, columns, m=m, block_groups=4)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, 45)), jnp.float32)
    dense = layout_dense(values, meta, columns, m)
    y = self.matmul(x, layout, m, block_tokens=16)
    assert_close(y, np.asarray(x, np.float64) @ dense[:45], x, dense, jnp.float32,
                 "vs layout definition")


class TestPrefillInterpret(TestPrefill):
  INTERPRET = True

  def test_one_xla_op_before_the_kernel_none_after(self):
    layout = prefill.prepare(*random_layout(64, 32, "32:2:8", jnp.float32)[:3], m=8)
    x = jnp.ones((20, 60), jnp.float32)
    ops = inner_equations(functools.partial(prefill.matmul, m=8), x, layout)
    assert ops[-1] == "pallas_call" and set(ops[:-1]) <= {"jit", "pad", "transpose"}, ops

  def test_prepare_tiles_the_condensed_weight(self):
    values, meta, columns, m = random_layout(100, 64, "32:2:8", jnp.bfloat16)
    layout = prefill.prepare(values, meta, columns, m=m, block_groups=8)
    assert layout.weight.shape == (2, 2, 32, 32) and layout.columns.shape == (2, 2, 32)
    # Step 1, group 2 of the step (group 10), kept column 3: row 2*4 + 3 of the step.
    np.testing.assert_array_equal(np.asarray(layout.columns[:, 1, 11]),
                                  np.asarray(columns[:, 3, 10]))
    dense = layout_dense(values, meta, columns, m)
    rows = np.asarray(columns[:, 3, 10])
    for r in range(2):
      np.testing.assert_array_equal(np.asarray(layout.weight[r, 1, :, 11], np.float64),
                                    dense[rows[r], r * 32:(r + 1) * 32])
    assert not np.asarray(layout.weight[:, 1, :, 4 * 5:], np.float64).any()  # groups past G

  def test_bad_arguments(self):
    values, meta, columns, m = random_layout(64, 32, "32:2:8", jnp.float32)
    layout = prefill.prepare(values, meta, columns, m=m)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(TypeError, match="x's dtype"):
      prefill.matmul(x.astype(jnp.float16), layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="x must be 2D"):
      prefill.matmul(x[None], layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="features"):
      prefill.matmul(jnp.ones((2, 1000), jnp.float32), layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="block_tokens"):
      prefill.matmul(x, layout, m=m, block_tokens=512, interpret=True)
    with pytest.raises(TypeError, match="PrefillLayout"):
      prefill.matmul(x, tuple(layout), m=m, interpret=True)
    with pytest.raises(ValueError, match="layout.columns"):
      prefill.matmul(x, layout._replace(columns=layout.columns[:, :, :4]), m=m, interpret=True)
    with pytest.raises(ValueError, match="block_groups"):
      prefill.prepare(values, meta, columns, m=m, block_groups=2)
    with pytest.raises(ValueError, match="meta must be uint8"):
      prefill.prepare(values, meta[:, :1], columns, m=m)
    with pytest.raises(TypeError, match="values must be"):
      prefill.prepare(values.astype(jnp.int8), meta, columns, m=m)

  def test_unsupported_reason(self):
    assert prefill.unsupported_reason(128, 8, jnp.bfloat16, 4096) is None
    assert "power of 2" in prefill.unsupported_reason(96, 8, jnp.bfloat16)
    assert "int8" in prefill.unsupported_reason(64, 8, jnp.int8)


@pytest.mark.skipif(cuda_lowering_unavailable() is not None,
                    reason=str(cuda_lowering_unavailable()))
class TestPrefillCudaLowering:
  """Lowers the compiled kernel for CUDA on any machine (see TestDecodeCudaLowering)."""

  @pytest.mark.parametrize("tokens, k, n, config, dtype, prep, call", [
      (4096, 4096, 4096, "128:2:8", jnp.bfloat16, {}, {}),
      (4096, 4096, 11008, "64:2:8", jnp.bfloat16, {}, dict(num_stages=4)),
      (1000, 11008, 4096, "64:2:5", jnp.bfloat16, dict(block_groups=32), dict(block_tokens=128)),
      (300, 4096, 4096, "64:2:4", jnp.float16, {}, {}),
      (7, 100, 70, "16:2:4", jnp.float32, {}, {}),
  ])
  def test_lowers_for_cuda(self, tokens, k, n, config, dtype, prep, call):
    v, _, m = (int(p) for p in config.split(":"))
    layout = prepared_structs(prefill.prepare, k, n, v, m, dtype, **prep)
    x = jax.ShapeDtypeStruct((tokens, k), dtype)
    text = lower_for_cuda(functools.partial(prefill.matmul, m=m, **call), x, layout)
    assert text.count("custom_call") == 1 and "triton" in text
