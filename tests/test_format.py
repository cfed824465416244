import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vnm_reference as ref
from vnm_jax import Permutation, VNMConfig, VNMWeight, compress, decompress, vnm_mask
from vnm_problems import numpy_decompress


@pytest.mark.parametrize("shape, config", [((196, 192), "64:2:5"), ((100, 130), "32:2:7"),
                                           ((64, 48), "2:4"), ((33, 7), "3:2:8"),
                                           ((20, 9), "1:2:4")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_exact(shape, config, dtype):
  kernel = jax.random.normal(jax.random.key(0), shape).astype(dtype)
  mask = vnm_mask(kernel, config)
  w = compress(kernel, config)
  assert w.values.dtype == dtype and w.shape == shape
  np.testing.assert_array_equal(np.asarray(decompress(w)), np.asarray(kernel * mask))
  if dtype == jnp.float32:
    np.testing.assert_array_equal(numpy_decompress(w), np.asarray(kernel * mask))


def test_layout_shapes_and_meta_values():
  w = compress(jax.random.normal(jax.random.key(1), (100, 130)), "32:2:7")
  r, g, half = 5, 15, 16
  assert w.values.shape == (r, 2, g, 32) and w.meta.shape == (r, g, half)
  assert w.columns.shape == (r, 4, g) and w.meta.dtype == jnp.uint8
  nibbles = np.concatenate([np.asarray(w.meta) & 15, np.asarray(w.meta) >> 4], axis=-1)
  assert np.all((nibbles & 3) < (nibbles >> 2))  # pos0 < pos1
  columns = np.asarray(w.columns)
  assert np.all(np.diff(columns, axis=1) > 0)  # slots in increasing column order
  group_of_column = columns // 7
  np.testing.assert_array_equal(group_of_column, np.arange(g)[None, None, :].repeat(4, 1)
                                .repeat(r, 0))


def test_given_mask_and_permutation_fold_into_columns():
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.standard_normal((60, 70)), jnp.float32)
  perm = Permutation(rng.permutation(60), rng.permutation(70))
  mask = vnm_mask(kernel, "16:2:6", permutation=perm)
  w = compress(kernel, "16:2:6", mask=mask, permutation=perm)
  np.testing.assert_array_equal(np.asarray(decompress(w)), np.asarray(kernel * mask))
  np.testing.assert_array_equal(numpy_decompress(w), np.asarray(kernel * mask))
  np.testing.assert_array_equal(np.asarray(w.output_index), np.argsort(perm.outputs))
  # Columns are absolute (original) input indices: those of block 0, group 0 are inputs[0:6].
  assert set(np.asarray(w.columns)[0, :, 0]) <= set(perm.inputs[:6])


def test_sparser_mask_compresses_too():
  kernel = jnp.ones((16, 8))
  mask = np.zeros((16, 8), bool)
  mask[3, 2] = True
  w = compress(kernel, "8:2:8", mask=mask)
  np.testing.assert_array_equal(np.asarray(decompress(w)), mask.astype(np.float32))


def test_memory_at_64_2_8_bf16_within_target():
  w = compress(jax.random.normal(jax.random.key(3), (1024, 1024)).astype(jnp.bfloat16), "64:2:8")
  assert w.nbytes <= 0.3 * w.dense_nbytes
  assert w.dense_nbytes == 1024 * 1024 * 2


def test_is_a_pytree_with_static_shape_and_config():
  w = compress(jnp.ones((16, 16)), "8:2:8")
  leaves, treedef = jax.tree.flatten(w)
  assert len(leaves) == 3  # values, meta, columns (output_index is None)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.config == VNMConfig(8, 2, 8) and rebuilt.shape == (16, 16)
  doubled = jax.jit(lambda w: jax.tree.map(lambda x: x, w))(w)
  np.testing.assert_array_equal(np.asarray(decompress(doubled)), np.asarray(decompress(w)))


def test_compress_errors():
  with pytest.raises(ValueError, match="mask is not 8:2:8"):
    compress(jnp.ones((16, 8)), "8:2:8", mask=np.ones((16, 8), bool))
  with pytest.raises(ValueError, match=r"mask must have the kernel's shape \(16, 8\)"):
    compress(jnp.ones((16, 8)), "8:2:8", mask=np.ones((8, 8), bool))
  with pytest.raises(ValueError, match="must be 2D"):
    compress(jnp.ones((4, 4, 4)), "8:2:8")
  with pytest.raises(ValueError, match="rule must be one of"):
    compress(jnp.ones((16, 8)), "8:2:8", rule="best")
  with pytest.raises(ValueError, match="n must be 2"):
    compress(jnp.ones((16, 8)), "8:4:8")


def test_compress_permutes_once_and_checks_the_permuted_mask(monkeypatch):
  # Issue 12 item 5: the permutation is validated once, kernel and mask permuted once.
  import vnm_jax.format as format_module
  calls = {"permute": 0, "validate_permutation": 0}
  for name in calls:
    original = getattr(format_module, name)

    def counted(*args, _original=original, _name=name, **kwargs):
      calls[_name] += 1
      return _original(*args, **kwargs)
    monkeypatch.setattr(format_module, name, counted)
  rng = np.random.default_rng(5)
  kernel = jnp.asarray(rng.standard_normal((30, 20)), jnp.float32)
  perm = Permutation(rng.permutation(30), rng.permutation(20))
  mask = vnm_mask(kernel, "8:2:6", permutation=perm)
  w = compress(kernel, "8:2:6", mask=mask, permutation=perm)
  assert calls == {"permute": 2, "validate_permutation": 1}
  np.testing.assert_array_equal(np.asarray(decompress(w)), np.asarray(kernel * mask))
  calls.update(permute=0, validate_permutation=0)
  w = compress(kernel, "8:2:6", permutation=perm)  # mask computed on the permuted kernel
  assert calls == {"permute": 1, "validate_permutation": 1}
  np.testing.assert_array_equal(np.asarray(decompress(w)), np.asarray(kernel * mask))


def damaged(w, **changes):
  fields = dict(values=w.values, meta=w.meta, columns=w.columns, output_index=w.output_index,
                shape=w.shape, config=w.config)
  fields.update(changes)
  return VNMWeight(**fields)


def weight_for_validation():
  rng = np.random.default_rng(6)
  kernel = jnp.asarray(rng.standard_normal((30, 20)), jnp.float32)
  return compress(kernel, "8:2:6", permutation=Permutation(rng.permutation(30),
                                                          rng.permutation(20)))


# (change, message): every damaged field names itself and the first bad index.
DAMAGES = {
    "column-too-large": (lambda w: dict(columns=w.columns.at[1, 2, 3].set(30)),
                         r"VNMWeight.columns\[1, 2, 3\] = 30 is out of range \[0, 30\)"),
    "column-negative": (lambda w: dict(columns=w.columns.at[0, 1, 4].set(-2)),
                        r"VNMWeight.columns\[0, 1, 4\] = -2 is out of range"),
    "column-repeated": (lambda w: dict(columns=w.columns.at[2, 1, 0].set(w.columns[2, 0, 0])),
                        r"VNMWeight.columns\[2, :, 0\] = .* repeats a column"),
    "values-shape": (lambda w: dict(values=w.values[:, :, :-1]),
                     r"VNMWeight.values must have shape \(3, 2, 5, 8\) .* got \(3, 2, 4, 8\)"),
    "values-dtype": (lambda w: dict(values=w.values.astype(jnp.int32)),
                     r"VNMWeight.values must have a floating dtype, got int32"),
    "meta-dtype": (lambda w: dict(meta=w.meta.astype(jnp.int32)),
                   r"VNMWeight.meta must have dtype uint8, got int32"),
    "shape-disagrees": (lambda w: dict(shape=(36, 20)),
                        r"VNMWeight.values must have shape \(3, 2, 6, 8\) for a kernel of shape "
                        r"\(36, 20\)"),
    "shape-zero": (lambda w: dict(shape=(0, 20)),
                   r"VNMWeight.shape has a zero-size dimension: shape \(0, 20\)"),
    "output-index-repeat": (lambda w: dict(output_index=w.output_index.at[7].set(
        w.output_index[2])), r"VNMWeight.output_index\[7\] = \d+ repeats an earlier entry"),
    "output-index-range": (lambda w: dict(output_index=w.output_index.at[4].set(20)),
                           r"VNMWeight.output_index\[4\] = 20 is out of range \[0, 20\)"),
    "output-index-shape": (lambda w: dict(output_index=w.output_index[:-1]),
                           r"VNMWeight.output_index must have shape \(20,\)"),
    "equal-positions": (lambda w: dict(meta=w.meta.at[1, 3, 2].set(0x55)),
                        r"VNMWeight.meta: row 2 of group 3 in row block 1 .* two equal "
                        r"positions 1"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_validate_names_the_damaged_field_and_index(name):
  w = weight_for_validation()
  assert w.validate() is w
  change, message = DAMAGES[name]
  with pytest.raises(ValueError, match=message):
    damaged(w, **change(w)).validate()


def test_check_under_checkify_and_tracers():
  from jax.experimental import checkify
  w = weight_for_validation()

  def checked(w):
    w.check()
    return decompress(w)

  error, _ = checkify.checkify(jax.jit(checked))(w)
  error.throw()  # A valid weight passes.
  for name in ("column-too-large", "column-repeated", "output-index-repeat", "equal-positions"):
    error, _ = checkify.checkify(jax.jit(checked))(damaged(w, **DAMAGES[name][0](w)))
    with pytest.raises(checkify.JaxRuntimeError, match="VNMWeight"):
      error.throw()
  with pytest.raises(TypeError, match="validate needs concrete arrays"):
    jax.jit(lambda w: w.validate().values)(w)


def test_zero_size_kernels_raise():
  for shape in ((0, 8), (16, 0)):
    with pytest.raises(ValueError, match=rf"kernel has a zero-size dimension: shape "
                                         rf"\({shape[0]}, {shape[1]}\)"):
      compress(jnp.ones(shape), "8:2:4")
