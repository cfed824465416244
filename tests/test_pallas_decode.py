"""The Pallas decode kernel against its reference and dense math.

``TestDecode`` runs the compiled kernel (GPU only); ``TestDecodeInterpret`` runs the same
tests in the Pallas interpreter on any machine; ``TestDecodeCudaLowering`` lowers the
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
from vnm_jax.ops.vnm_matmul import pallas_decode as decode

# (tokens, in, out, config, dtype, permuted, prepare options, call options); the weights
# are those of tests/test_pallas_prefill.py (compressed once for both).
CASES = [
    pytest.param(1, 73, 100, "32:2:5", jnp.float32, False, {}, {}, id="v32-m5-f32-one-token"),
    pytest.param(1, 300, 64, "64:2:8", jnp.bfloat16, True, dict(block_groups=16), {},
                 id="v64-m8-bf16-one-token-permuted-3-steps"),
    pytest.param(5, 130, 70, "16:2:4", jnp.float16, True, {}, {}, id="v16-2to4-f16-permuted"),
    pytest.param(16, 200, 128, "128:2:8", jnp.bfloat16, False, dict(block_v=32), {},
                 id="v128-m8-bf16-sliced"),
    pytest.param(3, 100, 96, "32:2:16", jnp.float32, True, {}, {}, id="v32-m16-f32-permuted"),
    pytest.param(40, 96, 64, "64:2:6", jnp.bfloat16, False, dict(block_v=16),
                 dict(block_tokens=16), id="v64-m6-bf16-3-token-tiles"),
]


class TestDecode:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip(needs_gpu.kwargs["reason"])

  def matmul(self, x, layout, m, **kwargs):
    return decode.matmul(x, layout, m=m, interpret=self.INTERPRET, **kwargs)

  @pytest.mark.parametrize("tokens, k, n, config, dtype, permuted, prep, call", CASES)
  def test_matches_reference_and_dense_math(self, tokens, k, n, config, dtype, permuted, prep,
                                            call):
    x, w, dense = compressed_problem(tokens, k, n, config, dtype, permuted)
    layout = decode.prepare(w.values, w.meta, w.columns, m=w.config.m, **prep)
    y = self.matmul(x, layout, w.config.m, **call)
    r, v = w.values.shape[0], w.config.v
    assert y.shape == (tokens, r * v) and y.dtype == dtype
    block_dense = layout_dense(w.values, w.meta, w.columns, w.config.m)
    assert_close(y, decode.reference(x, layout, m=w.config.m), x, block_dense, dtype,
                 "vs reference")
    assert_close(blocks_to_outputs(y, w), np.asarray(x, np.float64) @ dense, x, np.abs(dense),
                 dtype, "vs x @ decompress(w)")

  @pytest.mark.parametrize("tokens", [1, 7])
  def test_arbitrary_columns_and_zero_padding(self, tokens):
    # Columns anywhere in [0, G*M), some at K..G*M-1 (x's zero padding), nonzero values.
    values, meta, columns, m = random_layout(45, 48, "16:2:8", jnp.float32, seed=tokens)
    assert (np.asarray(columns) >= 45).any()
    layout = decode.prepare(values, meta, columns, m=m)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, 45)), jnp.float32)
    dense = layout_dense(values, meta, columns, m)
    assert_close(self.matmul(x, layout, m), np.asarray(x, np.float64) @ dense[:45], x, dense,
                 jnp.float32, "vs layout definition")


class TestDecodeInterpret(TestDecode):
  INTERPRET = True

  def test_no_xla_op_around_the_kernel(self):
    layout = decode.prepare(*random_layout(64, 32, "32:2:8", jnp.float32)[:3], m=8)
    x = jnp.ones((3, 64), jnp.float32)
    assert inner_equations(functools.partial(decode.matmul, m=8), x, layout) == ["pallas_call"]

  def test_prepare_round_trips(self):
    values, meta, columns, _ = random_layout(100, 64, "32:2:8", jnp.bfloat16)
    layout = decode.prepare(values, meta, columns, m=8, block_v=16, block_groups=16)
    assert layout.values.shape == (2, 2, 1, 2, 16, 16)
    assert layout.meta.shape == (2, 2, 1, 16, 8) and layout.columns.shape == (2, 1, 4, 16)
    back = decode.stored_arrays(layout)
    groups = values.shape[2]
    np.testing.assert_array_equal(np.asarray(back[0][:, :, :groups]), np.asarray(values))
    np.testing.assert_array_equal(np.asarray(back[1][:, :groups]), np.asarray(meta))
    np.testing.assert_array_equal(np.asarray(back[2][:, :, :groups]), np.asarray(columns))
    assert not np.asarray(back[0][:, :, groups:]).any()  # padded groups weigh nothing

  def test_default_blocks_fill_the_gpu(self):
    # 4096 x 4096 at 64:2:8: 64 row blocks -> 4 slices of 16 outputs, 256 programs.
    assert decode.default_blocks(64, 512, 64, jnp.bfloat16) == (16, 64)
    assert decode.default_blocks(64, 512, 172, jnp.bfloat16) == (32, 32)
    assert decode.default_blocks(16, 3, 2, jnp.float32) == (16, 16)

  def test_bad_arguments(self):
    values, meta, columns, m = random_layout(64, 32, "32:2:8", jnp.float32)
    layout = decode.prepare(values, meta, columns, m=m)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(TypeError, match="x's dtype"):
      decode.matmul(x.astype(jnp.bfloat16), layout, m=m, interpret=True)
    with pytest.raises(TypeError, match="x must be"):
      decode.matmul(x.astype(jnp.int32), layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="x must be 2D"):
      decode.matmul(x[0], layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="features"):
      decode.matmul(jnp.ones((2, 1000), jnp.float32), layout, m=m, interpret=True)
    with pytest.raises(ValueError, match="block_tokens"):
      decode.matmul(x, layout, m=m, block_tokens=24, interpret=True)
    with pytest.raises(ValueError, match="m must be"):
      decode.matmul(x, layout, m=3, interpret=True)
    with pytest.raises(TypeError, match="DecodeLayout"):
      decode.matmul(x, tuple(layout), m=m, interpret=True)
    with pytest.raises(ValueError, match="layout.meta"):
      decode.matmul(x, layout._replace(meta=layout.meta[:, :, :, :1]), m=m, interpret=True)
    with pytest.raises(ValueError, match="block_v"):
      decode.prepare(values, meta, columns, m=m, block_v=64)
    with pytest.raises(ValueError, match="block_groups"):
      decode.prepare(values, meta, columns, m=m, block_groups=24)
    with pytest.raises(ValueError, match="columns must be int32"):
      decode.prepare(values, meta, columns.astype(jnp.int16), m=m)
    bad_v = random_layout(64, 48, "24:2:8", jnp.float32)
    with pytest.raises(ValueError, match="V=24"):
      decode.prepare(*bad_v[:3], m=8)

  def test_unsupported_reason(self):
    assert decode.unsupported_reason(64, 8, jnp.bfloat16, 1) is None
    assert "power of 2" in decode.unsupported_reason(48, 8, jnp.bfloat16)
    assert "power of 2" in decode.unsupported_reason(8, 8, jnp.float32)
    assert "float64" in decode.unsupported_reason(64, 8, jnp.float64)
    assert "M=3" in decode.unsupported_reason(64, 3, jnp.float32)


@pytest.mark.skipif(cuda_lowering_unavailable() is not None,
                    reason=str(cuda_lowering_unavailable()))
class TestDecodeCudaLowering:
  """Lowers the compiled kernel for CUDA on any machine: catches what the Triton lowering
  rejects (shapes, ops) that the interpreter accepts. Compiling the Triton IR to PTX and
  running it still needs the GPU (bench/gpu_check.sh)."""

  @pytest.mark.parametrize("tokens, k, n, config, dtype, call", [
      (1, 4096, 4096, "64:2:8", jnp.bfloat16, {}),
      (16, 4096, 11008, "64:2:5", jnp.bfloat16, {}),
      (64, 11008, 4096, "64:2:4", jnp.bfloat16, dict(num_warps=8)),
      (5, 4096, 4096, "128:2:8", jnp.float16, dict(num_stages=2)),
      (3, 100, 70, "16:2:4", jnp.float32, {}),
  ])
  def test_lowers_for_cuda(self, tokens, k, n, config, dtype, call):
    v, _, m = (int(p) for p in config.split(":"))
    layout = prepared_structs(decode.prepare, k, n, v, m, dtype)
    x = jax.ShapeDtypeStruct((tokens, k), dtype)
    text = lower_for_cuda(functools.partial(decode.matmul, m=m, **call), x, layout)
    assert text.count("custom_call") == 1 and "triton" in text
