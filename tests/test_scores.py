import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnm_jax.scores import Importance, importance_scores, magnitude_score, ria_score, wanda_score


def kernel_and_norms(shape=(7, 5), seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal(shape).astype(np.float32)
  norms = np.abs(rng.standard_normal(shape[0])).astype(np.float32) + 0.1
  return kernel, norms


def wanda_loop(kernel, norms):
  """score[j, i] = |W[j, i]| * ||X_j||, j = input (axis 0 of a Flax kernel)."""
  k, n = kernel.shape
  out = np.zeros((k, n))
  for j in range(k):
    for i in range(n):
      out[j, i] = abs(float(kernel[j, i])) * float(norms[j])
  return out


def ria_loop(kernel, norms, a):
  """The spec's formula on the PyTorch (out, in) weight M = kernel.T, transposed back."""
  weight = np.asarray(kernel, np.float64).T  # M[i, j]: output i, input j
  n_out, n_in = weight.shape
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    for j in range(n_in):
      over_outputs = sum(abs(weight[k, j]) for k in range(n_out))  # sum_k |M_kj|
      over_inputs = sum(abs(weight[i, k]) for k in range(n_in))  # sum_k |M_ik|
      out[i, j] = (abs(weight[i, j]) / over_outputs + abs(weight[i, j]) / over_inputs) \
          * float(norms[j]) ** a
  return out.T


def test_magnitude_is_absolute_value_in_float32():
  kernel, _ = kernel_and_norms()
  score = magnitude_score(jnp.asarray(kernel, jnp.bfloat16))
  assert score.dtype == jnp.float32
  np.testing.assert_array_equal(score, np.abs(np.asarray(jnp.asarray(kernel, jnp.bfloat16),
                                                         np.float32)))
  kernel3d = np.arange(-12, 12, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(magnitude_score(kernel3d), np.abs(kernel3d))


def test_wanda_matches_loop():
  kernel, norms = kernel_and_norms()
  np.testing.assert_allclose(wanda_score(kernel, norms), wanda_loop(kernel, norms), rtol=1e-6)


def test_wanda_scales_input_rows_not_output_columns():
  kernel = np.ones((3, 2), np.float32)
  norms = np.array([1.0, 2.0, 3.0], np.float32)
  np.testing.assert_array_equal(wanda_score(kernel, norms), [[1, 1], [2, 2], [3, 3]])


@pytest.mark.parametrize("a", [0.5, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(7, 5), (4, 9), (1, 3)])
def test_ria_matches_spec_formula(shape, a):
  kernel, norms = kernel_and_norms(shape, seed=3)
  np.testing.assert_allclose(ria_score(kernel, norms, a=a), ria_loop(kernel, norms, a),
                             rtol=1e-5)


def test_ria_default_exponent_is_one_half():
  kernel, norms = kernel_and_norms()
  np.testing.assert_allclose(ria_score(kernel, norms), ria_loop(kernel, norms, 0.5), rtol=1e-5)


def test_ria_zero_row_and_column_give_zero_not_nan():
  kernel, norms = kernel_and_norms((4, 3))
  kernel[1, :] = 0
  kernel[:, 2] = 0
  score = np.asarray(ria_score(kernel, norms))
  assert np.all(np.isfinite(score))
  assert np.all(score[1, :] == 0) and np.all(score[:, 2] == 0)
  # The other entries follow the formula on the non-zero part.
  expected = ria_loop(kernel[[0, 2, 3]][:, :2], norms[[0, 2, 3]], 0.5)
  np.testing.assert_allclose(score[[0, 2, 3]][:, :2], expected, rtol=1e-5)


def test_scores_are_jittable_and_match_eager():
  kernel, norms = kernel_and_norms()
  np.testing.assert_allclose(jax.jit(wanda_score)(kernel, norms), wanda_score(kernel, norms))
  jitted_ria = jax.jit(functools.partial(ria_score, a=0.25))
  np.testing.assert_allclose(jitted_ria(kernel, norms), ria_score(kernel, norms, a=0.25),
                             rtol=1e-6)


def test_importance_by_name_and_enum():
  kernel, norms = kernel_and_norms()
  np.testing.assert_array_equal(importance_scores(kernel, "magnitude"), np.abs(kernel))
  np.testing.assert_array_equal(importance_scores(kernel, Importance.WANDA, norms),
                                wanda_score(kernel, norms))
  np.testing.assert_array_equal(importance_scores(kernel, "RIA", norms), ria_score(kernel, norms))
  assert not Importance.MAGNITUDE.needs_input_norms and Importance.RIA.needs_input_norms


@pytest.mark.parametrize("name, error", [("snip", ValueError), (3, TypeError)])
def test_unknown_score_name(name, error):
  with pytest.raises(error, match="score must be"):
    Importance.parse(name)


@pytest.mark.parametrize("score", [wanda_score, ria_score])
def test_input_norm_errors(score):
  kernel, norms = kernel_and_norms()
  with pytest.raises(ValueError, match=r"input_norms must have shape \(in_features,\) = \(7,\)"):
    score(kernel, norms[:5])
  with pytest.raises(ValueError, match=r"input_norms must have shape"):
    score(kernel, np.ones(kernel.shape[1], np.float32))  # output width instead of input
  bad = norms.copy()
  bad[2] = np.nan
  with pytest.raises(ValueError, match="input_norms contains 1 NaN"):
    score(kernel, bad)
  bad = norms.copy()
  bad[0] = -1.0
  with pytest.raises(ValueError, match="input_norms contains negative entries"):
    score(kernel, bad)
  with pytest.raises(ValueError, match="input_norms is required"):
    score(kernel, None)


@pytest.mark.parametrize("score", [wanda_score, ria_score])
def test_kernel_errors(score):
  kernel, norms = kernel_and_norms()
  with pytest.raises(ValueError, match="kernel must be 2D"):
    score(kernel[None], norms)
  bad = kernel.copy()
  bad[0, 0] = np.inf
  with pytest.raises(ValueError, match="kernel contains 1 NaN or infinite"):
    score(bad, norms)
  with pytest.raises(TypeError, match="kernel must be a numeric array"):
    score(kernel > 0, norms)


@pytest.mark.parametrize("a", [-0.5, float("nan"), "half", True])
def test_ria_exponent_errors(a):
  kernel, norms = kernel_and_norms()
  with pytest.raises(ValueError, match="a \\(the RIA activation exponent\\) must be"):
    ria_score(kernel, norms, a=a)
