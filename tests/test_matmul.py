"""vnm_matmul through its API: every implementation and kind of weight against dense math.

Both implementations ("xla", and "pallas" in the Pallas interpreter on CPU) and both kinds
of weight (a VNMWeight prepared on the fly, a PreparedVNMWeight) are checked against a
numpy loop over the stored layout and against ``x @ decompress(w)``; token counts cross
the dispatch tables' boundaries so that every formulation runs. The kernels themselves
are tested on raw arrays in tests/test_pallas_*.py.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnm_jax import Permutation, VNMWeight, compress, decompress, prepare, vnm_matmul
from vnm_jax.ops.vnm_matmul import api, dispatch, xla
from vnm_jax.ops.vnm_matmul.prepared import PallasLayouts, XLALayout, resolve_implementation
from vnm_problems import assert_close, numpy_matmul, random_weight

# (x shape, kernel (K, N), config, dtype, permuted): V 16-128, M 4-16, shapes that do not
# divide, one token, leading batch axes; 9 and 20 tokens run the XLA "blocks" formulation.
CASES = [
    pytest.param((6, 73), (73, 100), "32:2:5", jnp.float32, False, id="v32-m5-ragged"),
    pytest.param((1, 64), (64, 64), "64:2:4", jnp.bfloat16, False, id="v64-2to4-one-token"),
    pytest.param((2, 3, 130), (130, 200), "128:2:8", jnp.float16, True, id="v128-m8-batch"),
    pytest.param((9, 96), (96, 70), "64:2:16", jnp.float32, True, id="v64-m16-permuted"),
    pytest.param((20, 50), (50, 40), "16:2:7", jnp.bfloat16, False, id="v16-m7-bf16"),
]


def make(x_shape, kernel_shape, config, dtype, permuted, seed=0):
  w = random_weight(*kernel_shape, config, dtype, permuted=permuted, seed=seed)
  x = jax.random.normal(jax.random.key(seed + 1), x_shape, jnp.float32).astype(dtype)
  return x, w


def check_against_references(y, x, w, dtype, tolerance_dtype=None):
  """y == x @ W (a numpy loop over the stored values), within dtype's (or tolerance_dtype's) bound.

  (decompress, the other dense reference, is checked against the same loop in test_format.)
  """
  leading = x.shape[:-1]
  assert y.shape == (*leading, w.shape[1]) and y.dtype == dtype
  tolerance_dtype = dtype if tolerance_dtype is None else tolerance_dtype
  expected = numpy_matmul(x, w).reshape(*leading, -1)
  magnitude = numpy_matmul(x, w, absolute=True).reshape(*leading, -1)
  assert_close(y, expected, magnitude, tolerance_dtype)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("x_shape, kernel_shape, config, dtype, permuted", CASES)
def test_every_implementation_matches_dense_math(implementation, x_shape, kernel_shape, config,
                                                 dtype, permuted):
  x, w = make(x_shape, kernel_shape, config, dtype, permuted)
  prepared = prepare(w, implementation=implementation, dtype=dtype)
  assert prepared.implementation == implementation
  check_against_references(vnm_matmul(x, prepared), x, w, dtype)
  if implementation == "xla":  # Pallas on the fly: test_gradients_of_a_vnm_weight_*[pallas].
    check_against_references(vnm_matmul(x, w, implementation=implementation), x, w, dtype)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_token_counts_across_the_dispatch_tables(implementation, monkeypatch):
  # Every formulation: XLA "batched" and "blocks" (8 and 2 a step); Pallas decode, prefill.
  # (This weight is small enough for "batched" at any of these sizes: the size rule is off.)
  monkeypatch.setattr(dispatch, "XLA_BATCHED_MAX_ELEMENTS", 0)
  jax.clear_caches()
  w = random_weight(75, 96, "32:2:6", permuted=True, seed=3)
  prepared = prepare(w, implementation=implementation)
  jitted = jax.jit(vnm_matmul)
  kernels = {1: ("batched", "decode"), 9: ("blocks", "decode"), 70: ("blocks", "prefill")}
  for tokens, (xla_kernel, pallas_kernel) in kernels.items():
    assert dispatch.choose_xla(tokens).formulation == xla_kernel
    assert dispatch.choose_pallas(tokens, w.config) == pallas_kernel
  for tokens in kernels:
    x = jax.random.normal(jax.random.key(tokens), (tokens, 75))
    check_against_references(jitted(x, prepared), x, w, jnp.float32)


def test_implementations_agree_on_a_compressed_kernel():
  rng = np.random.default_rng(3)
  kernel = jnp.asarray(rng.standard_normal((75, 130)), jnp.float32)
  permutation = Permutation(rng.permutation(75), rng.permutation(130))
  w = compress(kernel, "64:2:5", permutation=permutation)
  x = jnp.asarray(rng.standard_normal((4, 75)), jnp.float32)
  xla_y = np.asarray(vnm_matmul(x, prepare(w, implementation="xla")))
  pallas_y = np.asarray(vnm_matmul(x, prepare(w, implementation="pallas")))
  magnitude = numpy_matmul(x, w, absolute=True)
  assert_close(pallas_y, xla_y, magnitude, jnp.float32, factor=2)
  assert_close(xla_y, np.asarray(x, np.float64) @ np.asarray(kernel * (decompress(w) != 0),
                                                            np.float64), magnitude, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_formulations_match_the_reference_on_raw_arrays(dtype):
  w = random_weight(45, 96, "32:2:9", permuted=True)
  x = jax.random.normal(jax.random.key(0), (5, 45)).astype(dtype)
  x_pad = jnp.pad(x, ((0, 0), (0, w.values.shape[2] * 9 - 45)))
  condensed = xla.condensed_weight(w.values, w.meta, dtype)
  columns = xla.flat_columns(w.columns)
  expected = xla.reference(x_pad, w.values, w.meta, w.columns, m=9)
  raw = VNMWeight(w.values, w.meta, w.columns, None, w.shape, w.config)  # Row-block order.
  magnitude = numpy_matmul(x.astype(jnp.float32), raw, absolute=True)
  assert_close(expected, numpy_matmul(x.astype(jnp.float32), raw), magnitude, dtype)
  assert_close(xla.matmul_batched(x_pad, condensed, columns), expected, magnitude, dtype)
  for blocks_per_step in (1, 2):  # 3 row blocks: a ragged last chunk for 2.
    assert_close(xla.matmul_blocks(x_pad, condensed, columns, blocks_per_step=blocks_per_step),
                 expected, magnitude, dtype)


def loss_through(matmul, x, values, w):
  weight = VNMWeight(values, w.meta, w.columns, w.output_index, w.shape, w.config)
  return jnp.sum(jnp.sin(matmul(x, weight)))


def dense_loss(x, values, w):
  return loss_through(lambda a, b: jnp.dot(a, decompress(b),
                                           precision=jax.lax.Precision.HIGHEST), x, values, w)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gradients_of_a_vnm_weight_match_dense_math(implementation):
  # Ragged shapes, an output permutation and a leading batch axis; dense math's
  # gradient flows through decompress, which scatters the values into the kernel.
  x, w = make((2, 5, 70), (70, 90), "32:2:6", jnp.float32, True, seed=1)
  grads = jax.grad(lambda x, v: loss_through(
      lambda a, b: vnm_matmul(a, b, implementation=implementation), x, v, w),
      argnums=(0, 1))(x, w.values)
  expected = jax.grad(dense_loss, argnums=(0, 1))(x, w.values, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                               atol=1e-5 * np.abs(np.asarray(want)).max())


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_prepared_weight_is_differentiable_for_x_only(implementation):
  x, w = make((3, 70), (70, 90), "32:2:6", jnp.float32, True, seed=2)
  prepared = prepare(w, implementation=implementation)
  grad_x = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(vnm_matmul(x, prepared)))))(x)
  expected = jax.grad(dense_loss)(x, w.values, w)
  np.testing.assert_allclose(np.asarray(grad_x), np.asarray(expected), rtol=1e-4,
                             atol=1e-5 * np.abs(np.asarray(expected)).max())
  with pytest.raises(ValueError, match="differentiating a PreparedVNMWeight"):
    jax.grad(lambda p: jnp.sum(vnm_matmul(x, p)), allow_int=True)(prepared)


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


def temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("tokens", [1, 16, 128])
def test_prepared_weight_runs_no_op_on_the_weight(tokens):
  # A weight-sized temporary (a condensed copy, a cast, a transposed or padded weight)
  # would show in the compiled call's scratch memory; the on-the-fly path has one.
  # (Compiled only: 64 row blocks, so that a step's gathered x is small beside the weight.)
  w = random_weight(1024, 4096, "64:2:8")
  prepared = prepare(w, implementation="xla")
  condensed_bytes = prepared.layout.condensed.nbytes
  x = jnp.ones((tokens, 1024))
  assert temp_bytes(vnm_matmul, x, prepared) < condensed_bytes // 2
  assert temp_bytes(lambda x, w: vnm_matmul(x, w, implementation="xla"), x, w) >= condensed_bytes
  jaxpr = jax.make_jaxpr(vnm_matmul)(x, prepared)
  primitives = {str(eqn.primitive) for eqn in jaxpr.jaxpr.eqns}
  assert "convert_element_type" not in primitives and "transpose" not in primitives


def test_prepare_layouts_and_bytes():
  w = compress(jax.random.normal(jax.random.key(3), (512, 256)).astype(jnp.bfloat16), "64:2:8")
  prepared = prepare(w, implementation="xla")
  assert isinstance(prepared.layout, XLALayout) and prepared.dtype == jnp.bfloat16
  assert prepared.layout.condensed.shape == (4, 64, 4 * 64)  # (R, V, 4G)
  assert prepared.stored_nbytes == w.nbytes <= 0.3 * w.dense_nbytes
  # Resident: the condensed weight (4/M of dense) holds the values; meta and columns beside.
  assert prepared.values is None
  assert prepared.nbytes == (prepared.layout.condensed.nbytes + w.meta.nbytes
                             + 2 * w.columns.nbytes)
  assert "resident" in repr(prepared)
  for other in (prepared, prepare(w, implementation="pallas")):  # .weight reads back exactly
    for a, b in zip(jax.tree.leaves(other.weight), jax.tree.leaves(w)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  pallas = prepare(w, implementation="pallas", dtype=jnp.float32)
  assert isinstance(pallas.layout, PallasLayouts) and pallas.dtype == jnp.float32
  assert pallas.values is w.values and pallas.weight.values.dtype == jnp.bfloat16  # other dtype
  assert pallas.layout.prefill is not None
  two_four = prepare(compress(jnp.ones((64, 64)), "2:4"), implementation="pallas")
  assert two_four.layout.prefill is None  # 2:4 prefill would run dense FLOPs: decode only
  decode_only = prepare(w, implementation="pallas", max_tokens=1)
  assert decode_only.layout.prefill is None and decode_only.nbytes < pallas.nbytes
  x = jax.random.normal(jax.random.key(0), (70, 512), jnp.bfloat16)  # Runs on the decode layout.
  check_against_references(vnm_matmul(x, decode_only), x, w, jnp.bfloat16)
  assert jax.tree.structure(jax.jit(lambda p: p)(prepared)) == jax.tree.structure(prepared)


def test_prepared_weight_in_other_dtype_or_implementation():
  x, w = make((4, 73), (73, 100), "32:2:5", jnp.float32, True)
  # A layout prepared in bfloat16 holds the values rounded to it; float32 x casts it per call.
  prepared = prepare(w, implementation="xla", dtype=jnp.bfloat16)
  check_against_references(vnm_matmul(x, prepared), x, w, jnp.float32, jnp.bfloat16)
  # Another implementation than the prepared one runs from the stored (float32) weight.
  check_against_references(vnm_matmul(x, prepared, implementation="pallas"), x, w, jnp.float32)


def test_dispatch_tables():
  assert dispatch.choose_xla(1).formulation == "batched"
  assert dispatch.choose_xla(10**6).formulation == "blocks"
  # A small weight's gathered x stays small: batched up to tens of tokens.
  small_rows = 24 * 4 * 72  # 576 x 1536 at 64:2:8: 24 row blocks, 72 groups
  assert dispatch.choose_xla(32, small_rows).formulation == "batched"
  assert dispatch.choose_xla(128, small_rows) == dispatch.choose_xla(128)
  assert dispatch.choose_xla(64, 64 * 4 * 820).formulation == "blocks"  # 4096^2 at 64:2:5
  limits = [max_tokens for max_tokens, _ in dispatch.XLA_CPU_TABLE]
  assert limits[-1] is None and limits[:-1] == sorted(limits[:-1])
  config = w_config = random_weight(8, 8, "8:2:8").config
  assert dispatch.choose_pallas(1, config) == "decode"
  assert dispatch.choose_pallas(10**4, config) == "prefill"
  assert dispatch.choose_pallas(10, w_config, {"8:2:8": 4, "default": 64}) == "prefill"
  assert not dispatch.PALLAS_TABLE_MEASURED  # Flip it with a GPU crossover file.


def test_pallas_table_from_crossover(tmp_path):
  path = tmp_path / "crossover_bfloat16.json"
  path.write_text(json.dumps({"crossover": {
      "64:2:8": {"decode_max_tokens": 48, "prefill_min_tokens": 256},
      "64:2:5": {"decode_max_tokens": 32, "prefill_min_tokens": 128},
      "2:4": {"decode_max_tokens": None}}}))
  assert dispatch.pallas_table_from_crossover(str(path)) == {"64:2:8": 48, "64:2:5": 32,
                                                             "default": 32}


def test_default_is_xla_without_gpu_and_jit_works():
  x, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  if jax.default_backend() != "gpu":
    assert resolve_implementation(None, w.config, x.dtype) == "xla"
    assert prepare(w).implementation == "xla"
  check_against_references(jax.jit(vnm_matmul)(x, w), x, w, jnp.float32)
  check_against_references(jax.jit(vnm_matmul)(x, prepare(w)), x, w, jnp.float32)


def test_pallas_falls_back_to_xla_visibly(caplog):
  x, w = make((3, 40), (40, 24), "8:2:5", jnp.float32, False)  # V=8: no Triton dot that narrow
  logger = "vnm_jax.ops.vnm_matmul.prepared"
  with caplog.at_level(logging.WARNING, logger=logger):
    y = vnm_matmul(x, w, implementation="pallas")
    assert prepare(w, implementation="pallas").implementation == "xla"
  assert "V=8 is not a power of 2 >= 16" in caplog.text and "XLA" in caplog.text
  check_against_references(y, x, w, jnp.float32)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=logger):
    vnm_matmul(x, w, implementation="xla")
  assert caplog.text == ""


def test_zero_tokens():
  _, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  assert vnm_matmul(jnp.zeros((0, 73)), w).shape == (0, 100)
  assert vnm_matmul(jnp.zeros((2, 0, 73)), prepare(w)).shape == (2, 0, 100)


def test_bad_inputs_raise():
  x, w = make((6, 73), (73, 100), "32:2:5", jnp.float32, False)
  with pytest.raises(ValueError, match=r"implementation must be one of .* got 'cuda'"):
    vnm_matmul(x, w, implementation="cuda")
  with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 73\)"):
    vnm_matmul(x[:, :60], prepare(w))
  with pytest.raises(TypeError, match="x must be a floating array"):
    vnm_matmul(jnp.ones((3, 73), jnp.int32), w)
  with pytest.raises(TypeError, match="w must be a VNMWeight"):
    vnm_matmul(x, decompress(w))
  with pytest.raises(TypeError, match="w must be a VNMWeight"):
    prepare(decompress(w))
  with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16, got int8"):
    prepare(w, dtype=jnp.int8)
  with pytest.raises(ValueError, match="implementation must be one of"):
    prepare(w, implementation="triton")
  with pytest.raises(ValueError, match="max_tokens must be a positive int or None, got 0"):
    prepare(w, max_tokens=0)
  damaged = VNMWeight(w.values, w.meta, w.columns.at[0, 0, 0].set(999), None, w.shape,
                      w.config)
  with pytest.raises(ValueError, match=r"VNMWeight.columns\[0, 0, 0\] = 999 is out of range"):
    prepare(damaged)
  assert api.PERTURBED_PREPARED_MSG.startswith("vnm_matmul:")
  empty = VNMWeight(w.values[:, :, :0], w.meta[:, :0], w.columns[:, :, :0], None, (0, 100),
                    w.config)
  for call in (lambda: prepare(empty, validate=False), lambda: vnm_matmul(x[:, :0], empty)):
    with pytest.raises(ValueError, match=r"w.shape has a zero-size dimension: shape \(0, 100\)"):
      call()
