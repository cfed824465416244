import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vnm_reference as ref
from vnm_jax import Permutation, VNMConfig, as_matrix, from_matrix, is_vnm, nm_mask, vnm_mask

SHAPES_AND_CONFIGS = [
    ((576, 192), "64:2:5"),  # 576 % 5 = 1, 192 % 64 = 0
    ((100, 130), "32:2:7"),  # neither divides
    ((64, 64), "16:2:8"),
    ((37, 21), "8:2:6"),
    ((30, 50), "2:4"),
    ((16, 300), "128:2:16"),  # fewer rows than one group: one padded group
]


def random_scores(shape, seed=0):
  return np.abs(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape, config", SHAPES_AND_CONFIGS)
def test_column_l1_matches_numpy_reference(shape, config):
  cfg = VNMConfig.parse(config)
  scores = random_scores(shape)
  mask = np.asarray(vnm_mask(jnp.asarray(scores), cfg))
  np.testing.assert_array_equal(mask, ref.column_l1_mask(scores, cfg.v, cfg.m))


@pytest.mark.parametrize("shape, config", SHAPES_AND_CONFIGS)
def test_exhaustive_matches_numpy_reference(shape, config):
  cfg = VNMConfig.parse(config)
  scores = random_scores(shape, seed=1)
  mask = np.asarray(vnm_mask(jnp.asarray(scores), cfg, rule="exhaustive"))
  np.testing.assert_array_equal(mask, ref.exhaustive_mask(scores, cfg.v, cfg.m))


@pytest.mark.parametrize("shape, config", SHAPES_AND_CONFIGS)
def test_exhaustive_keeps_at_least_column_l1(shape, config):
  scores = random_scores(shape, seed=2)
  l1 = vnm_mask(jnp.asarray(scores), config)
  best = vnm_mask(jnp.asarray(scores), config, rule="exhaustive")
  assert ref.kept_score(scores, best) >= ref.kept_score(scores, l1) - 1e-3


def test_default_scores_are_magnitude_and_groups_run_along_inputs():
  kernel = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)
  mask = np.asarray(vnm_mask(kernel, "8:2:8"))
  np.testing.assert_array_equal(mask, ref.column_l1_mask(np.abs(kernel), 8, 8))
  # M groups run along axis 0 (inputs): each output column keeps 2 of every 8 inputs.
  np.testing.assert_array_equal(mask.reshape(5, 8, 24).sum(axis=1), 2)
  # The transposed (PyTorch-style) layout is a different mask.
  assert not np.array_equal(mask, np.asarray(vnm_mask(kernel.T, "8:2:8")).T)


def test_scores_override_kernel():
  kernel = np.ones((16, 8), np.float32)
  scores = np.zeros((16, 8), np.float32)
  scores[[0, 1, 4, 5, 8, 9, 12, 13], :] = 1.0
  mask = np.asarray(vnm_mask(kernel, "8:2:4", scores=scores))
  np.testing.assert_array_equal(mask, scores > 0)


def test_jittable_inside_a_training_step():
  kernel = jax.random.normal(jax.random.key(0), (48, 32))
  step = jax.jit(lambda w: w * vnm_mask(w, VNMConfig(16, 2, 6)))
  np.testing.assert_array_equal(np.asarray(step(kernel)),
                                np.asarray(kernel) * ref.column_l1_mask(np.abs(kernel), 16, 6))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(k=st.integers(1, 40), n=st.integers(1, 40), v=st.sampled_from([1, 2, 4, 8, 16]),
                  m=st.integers(4, 9), rule=st.sampled_from(["column_l1", "exhaustive"]),
                  seed=st.integers(0, 2**16))
def test_structure_invariants(k, n, v, m, rule, seed):
  scores = random_scores((k, n), seed)
  mask = np.asarray(vnm_mask(jnp.asarray(scores), VNMConfig(v, 2, m), rule=rule))
  assert mask.shape == (k, n) and mask.dtype == bool
  assert ref.structure_ok(mask, v, m)
  assert is_vnm(mask, VNMConfig(v, 2, m))
  # Every row keeps exactly min(2, real columns) entries of every group.
  for g0 in range(0, k, m):
    expected = min(2, min(k, g0 + m) - g0)
    np.testing.assert_array_equal(mask[g0:g0 + m].sum(axis=0), expected)


def test_is_vnm_rejects_broken_structure():
  mask = np.zeros((8, 4), bool)
  mask[:2, 0] = True
  mask[2:4, 1] = True
  assert is_vnm(mask, "4:2:8")  # 4 columns used, 2 per row
  mask[4, 2] = True  # a fifth column in the block
  assert not is_vnm(mask, "4:2:8")
  assert is_vnm(mask, "1:2:8")  # with V = 1 each row is its own block
  mask[5, 0] = True  # a third entry in row 0
  assert not is_vnm(mask, "1:2:8")


def test_permuted_mask_is_vnm_after_permutation_only():
  rng = np.random.default_rng(4)
  kernel = rng.standard_normal((60, 70)).astype(np.float32)
  perm = Permutation(rng.permutation(60), rng.permutation(70))
  mask = np.asarray(vnm_mask(kernel, "16:2:6", permutation=perm))
  permuted = mask[perm.inputs][:, perm.outputs]
  assert ref.structure_ok(permuted, 16, 6)
  np.testing.assert_array_equal(
      permuted, ref.column_l1_mask(np.abs(kernel)[perm.inputs][:, perm.outputs], 16, 6))
  assert is_vnm(mask, "16:2:6", permutation=perm)
  assert not ref.structure_ok(mask, 16, 6)


@pytest.mark.parametrize("shape, in_axes", [((12, 3, 8), (0,)), ((3, 8, 20), (0, 1)),
                                            ((4, 10, 6), (-3,))])
def test_nd_kernels_are_masked_on_their_2d_view(shape, in_axes):
  kernel = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
  mask = vnm_mask(kernel, "4:2:5", in_axes=in_axes)
  assert mask.shape == shape
  matrix = np.asarray(as_matrix(jnp.asarray(kernel), in_axes))
  np.testing.assert_array_equal(np.asarray(as_matrix(mask, in_axes)),
                                ref.column_l1_mask(np.abs(matrix), 4, 5))
  np.testing.assert_array_equal(np.asarray(from_matrix(matrix, shape, in_axes)), kernel)


def test_nm_mask_plain_2to4_along_any_axis():
  scores = random_scores((10, 6), 6)
  mask = np.asarray(nm_mask(scores, 2, 4, axis=0))
  np.testing.assert_array_equal(mask, ref.column_l1_mask(scores, 1, 4))
  mask_t = np.asarray(nm_mask(scores.T, 2, 4, axis=1))
  np.testing.assert_array_equal(mask_t, mask.T)
  np.testing.assert_array_equal(np.asarray(nm_mask(scores, 1, 3)).reshape(-1, 6)[:3].sum(0), 1)


def test_errors_name_argument_value_and_allowed():
  kernel = np.ones((8, 8), np.float32)
  with pytest.raises(ValueError, match="n must be 2"):
    vnm_mask(kernel, "64:3:8")
  with pytest.raises(ValueError, match="rule must be one of"):
    vnm_mask(kernel, "4:2:4", rule="random")
  with pytest.raises(ValueError, match=r"scores must have the kernel's shape \(8, 8\)"):
    vnm_mask(kernel, "4:2:4", scores=np.ones((8, 4)))
  bad = np.ones((8, 8), np.float32)
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="1 NaN or infinite"):
    vnm_mask(kernel, "4:2:4", scores=bad)
  with pytest.raises(ValueError, match="negative"):
    vnm_mask(kernel, "4:2:4", scores=-np.ones((8, 8)))
  with pytest.raises(ValueError, match="in_axes is required"):
    vnm_mask(np.ones((4, 4, 4)), "4:2:4")
  with pytest.raises(ValueError, match="in_axes entry 3"):
    vnm_mask(np.ones((4, 4, 4)), "4:2:4", in_axes=(3,))
  with pytest.raises(ValueError, match="at least 2 dims"):
    vnm_mask(np.ones(8), "4:2:4")
  with pytest.raises(ValueError, match="not a permutation"):
    vnm_mask(kernel, "4:2:4", permutation=Permutation(np.zeros(8, int), None))
  with pytest.raises(ValueError, match=r"shape \(8,\)"):
    vnm_mask(kernel, "4:2:4", permutation=Permutation(np.arange(7), None))
  with pytest.raises(TypeError, match="integer array"):
    vnm_mask(kernel, "4:2:4", permutation=Permutation(np.arange(8.0), None))
  with pytest.raises(ValueError, match="n <= m"):
    nm_mask(kernel, 3, 2)


def test_mask_of_a_kernel_sharded_over_explicit_mesh_axes():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  kernel = jax.random.normal(jax.random.key(0), (64, 128))
  sharded = jax.device_put(kernel, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "model")))
  with jax.sharding.set_mesh(mesh):
    mask = jax.jit(lambda w: vnm_mask(w, "16:2:8"))(sharded)
  assert mask.sharding.spec == sharded.sharding.spec
  np.testing.assert_array_equal(np.asarray(mask), ref.column_l1_mask(np.abs(kernel), 16, 8))
