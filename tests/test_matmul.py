"""vnm_matmul (both implementations) against dense math, its gradients, and its dispatch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_pallas_vnm_matmul import make_problem, numpy_matmul_blocks
from vnm_jax import Permutation, VNMConfig, VNMWeight, compress, decompress
from vnm_jax import matmul_xla
from vnm_jax.matmul import resolve_implementation, vnm_matmul

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}

# (x shape, kernel (K, N), config, dtype, permuted)
CASES = [
    pytest.param((6, 73), (73, 100), "32:2:5", jnp.float32, False, id="v32-m5-ragged"),
    pytest.param((1, 64), (64, 64), "64:2:4", jnp.bfloat16, False, id="v64-2to4-one-token"),
    pytest.param((2, 3, 130), (130, 200), "128:2:8", jnp.float16, True, id="v128-m8-batch-dims"),
    pytest.param((9, 96), (96, 70), "64:2:16", jnp.float32, True, id="v64-m16-permuted"),
]


def make(x_shape, kernel_shape, config, dtype, permuted, seed=0):
  """x and a random valid VNMWeight (built directly, no compress), output-permuted if asked."""
  k, n = kernel_shape
  x, layout = make_problem(int(np.prod(x_shape[:-1])), k, n, config, dtype, permuted, seed)
  output_index = (jnp.asarray(np.random.default_rng(seed).permutation(n), jnp.int32)
                  if permuted else None)
  w = VNMWeight(layout.values, layout.meta, layout.columns, output_index, (k, n),
                VNMConfig.parse(config))
  return x.reshape(x_shape), w


def dense_math(x, w):
  return np.asarray(x, np.float64) @ np.asarray(decompress(w), np.float64)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("x_shape, kernel_shape, config, dtype, permuted", CASES)
def test_matches_dense_math(implementation, x_shape, kernel_shape, config, dtype, permuted):
  x, w = make(x_shape, kernel_shape, config, dtype, permuted)
  y = vnm_matmul(x, w, implementation=implementation)
  assert y.shape == (*x_shape[:-1], kernel_shape[1]) and y.dtype == dtype
  expected = dense_math(x, w)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=TOLERANCE[dtype],
                             atol=TOLERANCE[dtype] * np.abs(expected).max())


@pytest.mark.parametrize("x_shape, kernel_shape, config, dtype, permuted", CASES)
def test_pallas_matches_xla_reference(x_shape, kernel_shape, config, dtype, permuted):
  x, w = make(x_shape, kernel_shape, config, dtype, permuted)
  pallas = np.asarray(vnm_matmul(x, w, implementation="pallas"), np.float64)
  xla = np.asarray(vnm_matmul(x, w, implementation="xla"), np.float64)
  # Both accumulate in float32; they differ by the order of summation and one rounding.
  np.testing.assert_allclose(pallas, xla, rtol=TOLERANCE[dtype],
                             atol=TOLERANCE[dtype] * np.abs(xla).max())


def test_compressed_kernel_end_to_end():
  rng = np.random.default_rng(3)
  kernel = jnp.asarray(rng.standard_normal((75, 130)), jnp.float32)
  permutation = Permutation(rng.permutation(75), rng.permutation(130))
  w = compress(kernel, "64:2:5", permutation=permutation)
  x = jnp.asarray(rng.standard_normal((4, 75)), jnp.float32)
  for implementation in ("xla", "pallas"):
    np.testing.assert_allclose(np.asarray(vnm_matmul(x, w, implementation=implementation)),
                               dense_math(x, w), rtol=1e-5, atol=1e-4)


def test_xla_blocks_match_numpy_loops():
  x, w = make((5, 45), (45, 96), "32:2:9", jnp.float32, True)
  x_pad = jnp.pad(x, ((0, 0), (0, w.values.shape[2] * 9 - 45)))
  for blocks_per_step in (1, 2):  # 3 row blocks: a ragged last chunk for 2.
    y = matmul_xla.matmul_blocks(x_pad, w.values, w.meta, w.columns,
                                 blocks_per_step=blocks_per_step)
    np.testing.assert_allclose(np.asarray(y), numpy_matmul_blocks(x, w.values, w.meta, w.columns,
                                                                  9), rtol=1e-5, atol=1e-5)


def loss_through(matmul, x, values, w):
  weight = VNMWeight(values, w.meta, w.columns, w.output_index, w.shape, w.config)
  return jnp.sum(jnp.sin(matmul(x, weight)))


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gradients_match_dense_math(implementation):
  # Ragged shapes, an output permutation and a leading batch axis; dense math's
  # gradient flows through decompress, which scatters the values into the kernel.
  x, w = make((2, 5, 70), (70, 90), "32:2:6", jnp.float32, True, seed=1)
  grads = jax.grad(lambda x, v: loss_through(
      lambda a, b: vnm_matmul(a, b, implementation=implementation), x, v, w),
      argnums=(0, 1))(x, w.values)
  expected = jax.grad(lambda x, v: loss_through(
      lambda a, b: jnp.dot(a, decompress(b), precision=jax.lax.Precision.HIGHEST), x, v, w),
      argnums=(0, 1))(x, w.values)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_gradient_of_bf16_activations_with_f32_values():
  x, w = make((5, 70), (70, 90), "32:2:6", jnp.float32, True, seed=1)
  x = x.astype(jnp.bfloat16)
  grad_values = jax.grad(lambda v: loss_through(vnm_matmul, x, v, w).astype(jnp.float32))(
      w.values)
  assert grad_values.dtype == jnp.float32 and grad_values.shape == w.values.shape
  expected = jax.grad(lambda v: loss_through(
      lambda a, b: (a.astype(jnp.float32) @ decompress(b)).astype(jnp.bfloat16), x, v, w)
      .astype(jnp.float32))(w.values)
  np.testing.assert_allclose(np.asarray(grad_values), np.asarray(expected), rtol=5e-2,
                             atol=5e-2 * np.abs(np.asarray(expected)).max())


def test_default_is_xla_without_gpu_and_jit_works():
  x, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  if jax.default_backend() != "gpu":
    assert resolve_implementation(None, w, x.dtype) == "xla"
  y = jax.jit(vnm_matmul)(x, w)
  np.testing.assert_allclose(np.asarray(y), dense_math(x, w), rtol=1e-5, atol=1e-5)


def test_pallas_falls_back_to_xla_visibly(caplog):
  x, w = make((3, 40), (40, 24), "8:2:5", jnp.float32, False)  # V=8: no Triton dot that narrow
  with caplog.at_level(logging.WARNING, logger="vnm_jax.matmul"):
    y = vnm_matmul(x, w, implementation="pallas")
  assert "V=8 is not a power of 2 >= 16" in caplog.text and "XLA" in caplog.text
  np.testing.assert_allclose(np.asarray(y), dense_math(x, w), rtol=1e-5, atol=1e-5)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="vnm_jax.matmul"):
    vnm_matmul(x, w, implementation="xla")
  assert caplog.text == ""


def test_zero_tokens():
  _, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  assert vnm_matmul(jnp.zeros((0, 73)), w).shape == (0, 100)


def test_bad_inputs_raise():
  x, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  with pytest.raises(ValueError, match=r"implementation must be one of .* got 'cuda'"):
    vnm_matmul(x, w, implementation="cuda")
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 73\)"):
    vnm_matmul(x[:, :60], w)
  with pytest.raises(TypeError, match="x must be a floating array"):
    vnm_matmul(jnp.ones((3, 73), jnp.int32), w)
  with pytest.raises(TypeError, match="w must be a VNMWeight"):
    vnm_matmul(x, decompress(w))
