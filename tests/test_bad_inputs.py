"""Bad inputs to the public API: each is a TypeError or ValueError that names the
parameter (and the value or what is allowed), raised before any mask, score or search
is computed. Zero-size kernels are named with their shape wherever a kernel enters.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vnm_jax as V
from vnm_jax.masks import check_kernel_shape
from vnm_jax.permutation import Permutation
from vnm_jax.permutation_search import find_permutation, kept_score, unstructured_kept_score

K = jnp.asarray(np.random.default_rng(0).standard_normal((16, 24)), jnp.float32)
K3 = K.reshape(4, 4, 24)
NAN = K.at[0, 0].set(jnp.nan)
C = V.VNMConfig(8, 2, 8)
TREE = {"a": {"kernel": K}}
EMPTY = jnp.zeros((0, 8))
ZERO_TREE = {"a": {"kernel": EMPTY}}

CASES = [
    # (id, call, exception, message pattern)
    ("config bool", lambda: V.VNMConfig(True, 2, 8), TypeError, r"VNMConfig.v must be an int"),
    ("config float", lambda: V.VNMConfig(8, 2.0, 8), TypeError, r"VNMConfig.n must be an int"),
    ("config text", lambda: V.VNMConfig.parse("8:2:8:1"), ValueError, r"'V:N:M'.*'8:2:8:1'"),
    ("config None", lambda: V.VNMConfig.parse(None), TypeError, r"config must be .*got None"),
    ("config n", lambda: V.VNMConfig.parse("8:3:8"), ValueError, r"VNMConfig.n must be 2"),
    # vnm_mask / is_vnm / nm_mask / as_matrix / from_matrix
    ("mask zero in", lambda: V.vnm_mask(EMPTY, C), ValueError, r"kernel has a zero-size .*\(0, 8\)"),
    ("mask zero out", lambda: V.vnm_mask(jnp.zeros((8, 0)), C), ValueError, r"zero-size.*\(8, 0\)"),
    ("mask zero 3d", lambda: V.vnm_mask(jnp.zeros((4, 0, 8)), C, in_axes=(0,)), ValueError,
     r"zero-size.*\(4, 0, 8\)"),
    ("mask 1d", lambda: V.vnm_mask(jnp.zeros(8), C), ValueError, r"kernel must have at least 2"),
    ("mask bool kernel", lambda: V.vnm_mask(K > 0, C), TypeError, r"kernel must be a numeric"),
    ("mask text kernel", lambda: V.vnm_mask("abc", C), TypeError, r"kernel must be a numeric"),
    ("mask nan", lambda: V.vnm_mask(NAN, C), ValueError, r"scores contains 1 NaN"),
    ("mask scores neg", lambda: V.vnm_mask(K, C, scores=-jnp.abs(K)), ValueError,
     r"scores contains negative"),
    ("mask scores bool", lambda: V.vnm_mask(K, C, scores=K > 0), TypeError,
     r"scores must be a numeric .* bool"),
    ("mask scores shape", lambda: V.vnm_mask(K, C, scores=K[:, :3]), ValueError,
     r"scores must have the kernel's shape \(16, 24\)"),
    ("mask rule", lambda: V.vnm_mask(K, C, rule="best"), ValueError, r"rule must be one of"),
    ("mask config int", lambda: V.vnm_mask(K, 8), TypeError, r"config must be"),
    ("mask in_axes bool", lambda: V.vnm_mask(K3, C, in_axes=True), ValueError,
     r"in_axes entry True is not an axis"),
    ("mask in_axes text", lambda: V.vnm_mask(K3, C, in_axes="0"), ValueError,
     r"in_axes entry '0' is not an axis"),
    ("mask in_axes all", lambda: V.vnm_mask(K3, C, in_axes=(0, 1, 2)), ValueError,
     r"in_axes=\(0, 1, 2\) must name distinct axes"),
    ("mask 3d no in_axes", lambda: V.vnm_mask(K3, C), ValueError, r"in_axes is required"),
    ("mask perm length", lambda: V.vnm_mask(K, C, permutation=Permutation(jnp.arange(15), None)),
     ValueError, r"permutation.inputs must have shape \(16,\)"),
    ("mask perm repeats", lambda: V.vnm_mask(K, C, permutation=Permutation(jnp.zeros(16, int),
                                                                          None)),
     ValueError, r"permutation.inputs is not a permutation"),
    ("mask perm float", lambda: V.vnm_mask(K, C, permutation=Permutation(jnp.arange(16.), None)),
     TypeError, r"permutation.inputs must be an integer array"),
    ("mask perm tuple", lambda: V.vnm_mask(K, C, permutation=(None, None)), TypeError,
     r"permutation must be a vnm_jax.Permutation"),
    ("is_vnm zero", lambda: V.is_vnm(jnp.zeros((0, 8), bool), C), ValueError,
     r"mask has a zero-size .*\(0, 8\)"),
    ("is_vnm 1d", lambda: V.is_vnm(jnp.zeros(8, bool), C), ValueError, r"at least 2 dims"),
    ("nm_mask n bool", lambda: V.nm_mask(jnp.abs(K), True, 4), ValueError, r"n=True"),
    ("nm_mask n > m", lambda: V.nm_mask(jnp.abs(K), 5, 4), ValueError, r"1 <= n <= m"),
    ("nm_mask axis float", lambda: V.nm_mask(jnp.abs(K), 2, 4, axis=0.0), ValueError,
     r"axis=0.0 is not an axis"),
    ("nm_mask zero", lambda: V.nm_mask(jnp.zeros((0, 4)), 2, 4), ValueError, r"zero-size"),
    ("as_matrix zero", lambda: V.as_matrix(jnp.zeros((0, 4, 3)), (0,)), ValueError,
     r"kernel has a zero-size .*\(0, 4, 3\)"),
    ("from_matrix shape", lambda: V.from_matrix(jnp.zeros((4, 6)), (4, 5)), ValueError,
     r"matrix must have the \(in, out\) view shape \(4, 5\)"),
    ("from_matrix negative", lambda: V.from_matrix(jnp.zeros((4, 6)), (-4, -6)), ValueError,
     r"shape has a zero-size"),
    ("kernel shape 3d", lambda: check_kernel_shape((2, 3, 4)), ValueError,
     r"kernel must be 2D .* \(2, 3, 4\)"),
    # scores
    ("score name", lambda: V.importance_scores(K, "l2"), ValueError, r"score must be one of"),
    ("score type", lambda: V.Importance.parse(3), TypeError, r"score must be an Importance"),
    ("magnitude zero", lambda: V.magnitude_score(EMPTY), ValueError, r"zero-size .*\(0, 8\)"),
    ("magnitude text", lambda: V.magnitude_score("abc"), TypeError, r"kernel must be a numeric"),
    ("wanda zero", lambda: V.wanda_score(EMPTY, jnp.ones(0)), ValueError, r"zero-size"),
    ("wanda 3d", lambda: V.wanda_score(K3, jnp.ones(4)), ValueError, r"kernel must be 2D"),
    ("wanda norms none", lambda: V.wanda_score(K, None), ValueError, r"input_norms is required"),
    ("wanda norms shape", lambda: V.wanda_score(K, jnp.ones((16, 1))), ValueError,
     r"input_norms must have shape \(in_features,\) = \(16,\)"),
    ("wanda norms nan", lambda: V.wanda_score(K, jnp.full(16, jnp.nan)), ValueError,
     r"input_norms contains 16 NaN"),
    ("wanda norms negative", lambda: V.wanda_score(K, -jnp.ones(16)), ValueError,
     r"input_norms contains negative"),
    ("ria a", lambda: V.ria_score(K, jnp.ones(16), a=-1), ValueError, r"a \(the RIA"),
    ("ria a bool", lambda: V.ria_score(K, jnp.ones(16), a=True), ValueError, r"a \(the RIA"),
    ("ria zero", lambda: V.ria_score(EMPTY, jnp.ones(0)), ValueError, r"zero-size"),
    # trees
    ("tree empty", lambda: V.tree_configs({}, C), ValueError, r"params has no leaves"),
    ("tree None", lambda: V.tree_masks(None, C), ValueError, r"params has no leaves"),
    ("tree filter type", lambda: V.tree_configs(TREE, C, filter=3), TypeError,
     r"filter must be None, a regex string or a predicate"),
    ("tree filter regex", lambda: V.tree_configs(TREE, C, filter="("), ValueError,
     r"filter has an invalid regular expression"),
    ("tree filter none", lambda: V.tree_configs(TREE, C, filter="nothing"), ValueError,
     r"filter='nothing' selected no leaf"),
    ("tree config", lambda: V.tree_configs(TREE, "9"), ValueError, r"config: config must look"),
    ("tree configs stray", lambda: V.tree_configs(TREE, C, configs={"b/": "2:4"}), ValueError,
     r"configs patterns \['b/'\] match no leaf"),
    ("tree zero kernel", lambda: V.tree_configs(ZERO_TREE, C), ValueError,
     r"kernel 'a/kernel' has a zero-size .*\(0, 8\)"),
    ("tree masks zero", lambda: V.tree_masks(ZERO_TREE, C), ValueError,
     r"kernel 'a/kernel' has a zero-size"),
    ("tree masks rule", lambda: V.tree_masks(TREE, C, rule="x"), ValueError, r"rule must be"),
    ("tree masks score", lambda: V.tree_masks(TREE, C, score="x"), ValueError,
     r"score must be one of"),
    ("tree masks scores stray", lambda: V.tree_masks(TREE, C, scores={"b/kernel": K}),
     ValueError, r"scores has entries for paths that are not in params: 'b/kernel'"),
    ("tree masks scores nan", lambda: V.tree_masks(TREE, C, scores={"a/kernel": NAN}),
     ValueError, r"while masking 'a/kernel': scores contains 1 NaN"),
    ("tree masks norms stray", lambda: V.tree_masks(TREE, C, score="wanda",
                                                    input_norms={"b/kernel": jnp.ones(16)}),
     ValueError, r"input_norms has entries for paths that are not in params"),
    ("tree masks perms stray", lambda: V.tree_masks(
        TREE, C, permutations={"b/kernel": Permutation(None, None)}), ValueError,
     r"permutations has entries for paths that are not in params"),
    ("tree masks in_axes type", lambda: V.tree_masks(TREE, C, in_axes=(0,)), TypeError,
     r"in_axes must be a mapping"),
    ("apply masks float", lambda: V.tree_apply_masks(TREE, {"a": {"kernel": K}}), TypeError,
     r"masks\['a/kernel'\] must be a bool array"),
    ("apply masks stray", lambda: V.tree_apply_masks(TREE, {"b": {"kernel": K > 0}}), ValueError,
     r"masks has entries for paths that are not in params"),
    ("apply masks shape", lambda: V.tree_apply_masks(TREE, {"a": {"kernel": K[:3] > 0}}),
     ValueError, r"masks\['a/kernel'\] has shape \(3, 24\)"),
    ("kernel_scores none", lambda: V.kernel_scores({}, "magnitude"), ValueError,
     r"selected no leaf"),
    ("kernel_scores norms", lambda: V.kernel_scores(TREE, "wanda", input_norms={}), ValueError,
     r"score='wanda' needs input_norms for 'a/kernel'"),
    ("kernel_scores zero", lambda: V.kernel_scores(ZERO_TREE, "magnitude"), ValueError,
     r"while scoring 'a/kernel': kernel has a zero-size"),
    ("tree_permute value", lambda: V.tree_permute(TREE, {"a/kernel": "x"}), TypeError,
     r"permutation must be a vnm_jax.Permutation"),
    ("path_str int", lambda: V.path_str(3), TypeError, r"path must be a sequence"),
    # permutation search
    ("find zero", lambda: find_permutation(EMPTY, C), ValueError, r"kernel has a zero-size"),
    ("find nan", lambda: find_permutation(NAN, C), ValueError, r"NaN"),
    ("find budget", lambda: find_permutation(K, C, time_budget_s=-1), ValueError,
     r"time_budget_s must be a positive number"),
    ("find budget bool", lambda: find_permutation(K, C, time_budget_s=True), ValueError,
     r"time_budget_s must be a positive number"),
    ("find seed type", lambda: find_permutation(K, C, seed="x"), TypeError, r"seed must be"),
    ("find seed negative", lambda: find_permutation(K, C, seed=-1), ValueError,
     r"seed must be an int >= 0, got -1"),
    ("find outputs", lambda: find_permutation(K, C, search_outputs="yes"), TypeError,
     r"search_outputs must be True or False"),
    ("find tolerance", lambda: find_permutation(K, C, tolerance=float("nan")), ValueError,
     r"tolerance must be a share of the gap in \[0, 1\)"),
    ("find method", lambda: find_permutation(K, C, method="x"), ValueError,
     r"method must be one of"),
    ("kept zero", lambda: kept_score(EMPTY, C), ValueError, r"kernel has a zero-size"),
    ("kept negative", lambda: kept_score(-jnp.ones((16, 24)), C), ValueError, r"negative"),
    ("unstructured zero", lambda: unstructured_kept_score(np.ones((0, 4)), 0.5), ValueError,
     r"scores has a zero-size"),
    ("unstructured density", lambda: unstructured_kept_score(np.ones((4, 4)), True),
     ValueError, r"density must be in \(0, 1\]"),
    ("tree_permutations zero", lambda: V.tree_permutations(ZERO_TREE, C, progress=False),
     ValueError, r"kernel 'a/kernel' has a zero-size"),
    # selection
    ("select target", lambda: V.select_vm({(8, 8): 1.2}, float("nan")), ValueError,
     r"target must be a finite positive speedup"),
    ("select target bool", lambda: V.select_vm({(8, 8): 1.2}, True), TypeError,
     r"target must be a number"),
    ("select empty", lambda: V.select_vm({}, 1.0), ValueError, r"speedups is empty"),
    ("select key", lambda: V.select_vm({(8,): 1.2}, 1.0), TypeError, r"keys must be \(v, m\)"),
    ("diversity v", lambda: V.mask_diversity(0, 8), ValueError, r"v must be >= 1"),
    ("speedups tokens", lambda: V.measure_speedups({(8, 8): 1}, ["8:2:8"], 0, progress=False),
     ValueError, r"tokens must be a positive int, got 0"),
    ("speedups shape", lambda: V.measure_speedups({(0, 8): 1}, ["8:2:8"], 4, progress=False),
     ValueError, r"gemm_shapes entries must be .* positive ints, got \(0, 8\)"),
    ("speedups candidates", lambda: V.measure_speedups({(8, 8): 1}, [], 4, progress=False),
     ValueError, r"candidates is empty"),
    ("gemm shapes zero", lambda: V.model_gemm_shapes(ZERO_TREE), ValueError,
     r"selected leaf 'a/kernel' has a zero-size"),
    # calibration
    ("norms model", lambda: V.collect_input_norms("model", [K]), TypeError,
     r"model must be a flax.linen.Module or a flax.nnx.Module"),
    ("norms batches", lambda: V.collect_input_norms(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), [],
                                                    progress=False),
     ValueError, r"batches yielded no batch"),
    ("norms zero kernel", lambda: V.collect_input_norms(
        nnx.Linear(0, 8, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0)), [K],
        progress=False),
     ValueError, r"kernel 'kernel' has a zero-size"),
    ("norms call", lambda: V.collect_input_norms(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), [K],
                                                 call=3), TypeError, r"call must be a function"),
    # checkpoints
    ("ckpt keep", lambda: V.Checkpointer("unused", max_to_keep=0), ValueError,
     r"max_to_keep must be None or an int >= 1, got 0"),
    ("ckpt dir None", lambda: V.Checkpointer(None), TypeError, r"directory must be a path"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, error, pattern):
  with pytest.raises(error, match=pattern) as raised:
    call()
  assert "\n" not in str(raised.value)


def test_checkpointer_arguments(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match=f"directory {a_file} is a file"):
    V.Checkpointer(a_file)
  with V.Checkpointer(tmp_path / "ckpt") as checkpointer:
    with pytest.raises(ValueError, match="tree has no arrays to save"):
      checkpointer.save(0, {"a": None})
    with pytest.raises(TypeError, match="metadata must be a JSON-serialisable dict"):
      checkpointer.save(0, {"a": K}, metadata={"config": C})
    with pytest.raises(TypeError, match="metadata must be a dict or None, got str"):
      checkpointer.save(0, {"a": K}, metadata="notes")
    with pytest.raises(ValueError, match="step must be an int >= 0, got True"):
      checkpointer.save(True, {"a": K})
    checkpointer.save(1, {"a": K})
    with pytest.raises(ValueError, match=r"step must be None \(the latest\) or an int >= 0, got "
                                         r"True"):
      checkpointer.restore({"a": K}, step=True)
  assert not (tmp_path / "ckpt" / "0").exists()  # nothing written by the refused saves
