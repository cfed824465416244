"""Tests for channel-permutation search, kept scores, the tree-level API and the fold."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vnm_reference as ref
from vnm_reference import assert_close
from vnm_jax import permutation_search as ps
from vnm_jax.config import VNMConfig
from vnm_jax.format import compress, decompress
from vnm_jax.masks import vnm_mask
from vnm_jax.matmul import vnm_matmul
from vnm_jax.permutation import Permutation, fold_output_permutation
from vnm_jax.trees import tree_masks


def _kernel(k, n, seed=0):
  """A kernel with uneven input and output channel norms, like a trained layer's."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((k, n)) * rng.gamma(2.0, size=(k, 1))
          * rng.gamma(2.0, size=(1, n))).astype(np.float32)


def _order(order, length):
  return np.arange(length) if order is None else np.asarray(order)


def _permuted(matrix, p):
  return matrix[_order(p.inputs, matrix.shape[0])][:, _order(p.outputs, matrix.shape[1])]


def _is_ordering(order, length):
  return order is None or np.array_equal(np.sort(np.asarray(order)), np.arange(length))


# (K, N, V, M). The tests reuse these few shapes: every new one compiles the search.
# 42 x 30 at 8:2:8 pads both axes; 1:2:4 is plain 2:4.
CASES = [(40, 32, 8, 5), (42, 30, 8, 8), (24, 16, 1, 4)]


@pytest.mark.parametrize("method", ["cocluster", "paper"])
@pytest.mark.parametrize("k, n, v, m", CASES)
def test_permuted_mask_is_vnm_and_keeps_at_least_identity(k, n, v, m, method):
  kernel = _kernel(k, n, seed=k + n)
  scores = np.abs(kernel)
  config = VNMConfig(v, 2, m)
  p = ps.find_permutation(kernel, config, method=method)
  assert _is_ordering(p.inputs, k) and _is_ordering(p.outputs, n)
  mask = np.asarray(vnm_mask(kernel, config, permutation=p))
  # Independent structure check (numpy loops) on the permuted coordinates.
  assert ref.structure_ok(_permuted(mask, p), v, m)
  # The library mask after permutation is the reference column-L1 mask there.
  np.testing.assert_array_equal(_permuted(mask, p),
                                ref.column_l1_mask(_permuted(scores, p), v, m))
  kept = ref.kept_score(scores, mask)
  kept_identity = ref.kept_score(scores, ref.column_l1_mask(scores, v, m))
  assert kept >= kept_identity - 1e-9 * kept_identity
  assert ps.kept_score(scores, config, permutation=p) == pytest.approx(kept, rel=1e-6)


@pytest.mark.parametrize("k, n, v, m", CASES[:2])
def test_search_beats_identity_and_paper_baseline(k, n, v, m):
  kernel = _kernel(k, n, seed=3)
  config = VNMConfig(v, 2, m)
  identity = ps.kept_score(np.abs(kernel), config)
  paper = ps.kept_score(np.abs(kernel), config,
                        permutation=ps.find_permutation(kernel, config, method="paper"))
  ours = ps.kept_score(np.abs(kernel), config, permutation=ps.find_permutation(kernel, config))
  assert paper > identity
  assert ours > identity * 1.01
  assert ours >= paper


def _planted(k, n, v, m, seed):
  """A kernel that is V:N:M (plus small noise) after a hidden permutation."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((k, n), bool)
  for g0, r0 in itertools.product(range(0, k, m), range(0, n, v)):
    columns = g0 + rng.choice(m, size=4, replace=False)
    for j in range(r0, r0 + v):
      mask[rng.choice(columns, size=2, replace=False), j] = True
  hidden = np.where(mask, 1 + rng.random((k, n)), 0.05 * rng.random((k, n))).astype(np.float32)
  scrambled = hidden[rng.permutation(k)][:, rng.permutation(n)]
  return scrambled, hidden


def test_search_recovers_most_of_a_planted_structure():
  scrambled, hidden = _planted(40, 32, 8, 5, seed=0)
  config = VNMConfig(8, 2, 5)
  optimum = ps.kept_score(hidden, config)
  identity = ps.kept_score(scrambled, config)
  found = ps.kept_score(scrambled, config, permutation=ps.find_permutation(scrambled, config))
  assert identity < 0.85 * optimum
  assert found > identity + 0.4 * (optimum - identity)


def test_kept_score_matches_mask_sum_for_both_rules():
  rng = np.random.default_rng(1)
  for k, n, v, m in [(26, 18, 4, 6), (40, 24, 8, 5), (16, 12, 3, 4)]:
    scores = rng.random((k, n)).astype(np.float32)
    p = Permutation(rng.permutation(k), rng.permutation(n))
    for rule, reference in (("column_l1", ref.column_l1_mask), ("exhaustive", ref.exhaustive_mask)):
      expected = ref.kept_score(_permuted(scores, p), reference(_permuted(scores, p), v, m))
      assert ps.kept_score(scores, f"{v}:2:{m}", permutation=p, rule=rule) == pytest.approx(
          expected, rel=1e-6)


def test_unstructured_kept_score():
  scores = np.arange(10, dtype=np.float32)
  assert ps.unstructured_kept_score(scores, 0.3) == 9 + 8 + 7
  with pytest.raises(ValueError, match="density must be in"):
    ps.unstructured_kept_score(scores, 0.0)


def test_never_worse_than_identity_when_identity_is_optimal():
  # Exactly 8:2:5 in the identity order with nothing else: identity keeps everything.
  _, hidden = _planted(40, 32, 8, 5, seed=2)
  clean = np.where(hidden >= 1, hidden, 0).astype(np.float32)
  config = VNMConfig(8, 2, 5)
  p = ps.find_permutation(clean, config)
  assert ps.kept_score(clean, config, permutation=p) == pytest.approx(clean.sum(), rel=1e-6)


def test_outputs_are_left_alone_where_they_cannot_matter():
  kernel = _kernel(40, 32)
  for config in ("8:2:4", "1:2:5", "32:2:5"):  # 2:4, V = 1, a single row block
    assert ps.find_permutation(kernel, config).outputs is None
  assert ps.find_permutation(kernel, "8:2:5", search_outputs=False).outputs is None


def test_deterministic_for_a_seed_and_time_budget_returns_a_valid_answer():
  kernel = _kernel(40, 32, seed=5)
  first = ps.find_permutation(kernel, "8:2:5", seed=3)
  second = ps.find_permutation(kernel, "8:2:5", seed=3)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(_order(a, 40 if a is first.inputs else 32),
                                  _order(b, 40 if b is second.inputs else 32))
  quick = ps.find_permutation(kernel, "8:2:5", time_budget_s=1e-3)
  assert _is_ordering(quick.inputs, 40) and _is_ordering(quick.outputs, 32)
  assert ps.kept_score(np.abs(kernel), "8:2:5", permutation=quick) >= ps.kept_score(
      np.abs(kernel), "8:2:5")


def test_scores_drive_the_search():
  kernel = _kernel(40, 32, seed=6)
  scores = np.random.default_rng(0).random((40, 32)).astype(np.float32)
  p = ps.find_permutation(kernel, "8:2:5", scores=scores)
  assert ps.kept_score(scores, "8:2:5", permutation=p) > ps.kept_score(scores, "8:2:5")


def test_nd_kernel_with_in_axes():
  kernel = _kernel(40, 32).reshape(40, 4, 8)  # (in, heads, head_dim)
  p = ps.find_permutation(kernel, "8:2:5", in_axes=(0,))
  mask = vnm_mask(kernel, "8:2:5", in_axes=(0,), permutation=p)
  matrix_mask = np.asarray(mask).reshape(40, 32)
  assert ref.structure_ok(_permuted(matrix_mask, p), 8, 5)


def test_bad_input_gives_clear_errors():
  kernel = _kernel(16, 16)
  with pytest.raises(ValueError, match="scores must have the kernel's shape"):
    ps.find_permutation(kernel, "8:2:8", scores=np.ones((16, 8)))
  with pytest.raises(ValueError, match="negative"):
    ps.find_permutation(kernel, "8:2:8", scores=-np.ones((16, 16)))
  with pytest.raises(ValueError, match="NaN or infinite"):
    ps.find_permutation(np.full((16, 16), np.nan), "8:2:8")
  with pytest.raises(ValueError, match="method must be one of"):
    ps.find_permutation(kernel, "8:2:8", method="annealing")
  with pytest.raises(ValueError, match="time_budget_s must be a positive"):
    ps.find_permutation(kernel, "8:2:8", time_budget_s=0)
  with pytest.raises(ValueError, match="tolerance must be a share"):
    ps.find_permutation(kernel, "8:2:8", tolerance=-0.1)
  with pytest.raises(ValueError, match="rule must be one of"):
    ps.find_permutation(kernel, "8:2:8", rule="l2")
  with pytest.raises(ValueError, match="config must look like"):
    ps.find_permutation(kernel, "8-2-8")
  # A permutation that is not one, or has the wrong length.
  with pytest.raises(ValueError, match="is not a permutation"):
    ps.kept_score(np.abs(kernel), "8:2:8", permutation=Permutation(np.zeros(16, np.int32), None))
  with pytest.raises(ValueError, match=r"must have shape \(16,\)"):
    ps.kept_score(np.abs(kernel), "8:2:8", permutation=Permutation(None, np.arange(15)))
  with pytest.raises(ValueError, match="is not a permutation"):
    vnm_mask(kernel, "8:2:8", permutation=Permutation(None, np.r_[np.arange(15), 3]))
  with pytest.raises(ValueError, match=r"must have shape \(16,\)"):
    compress(kernel, "8:2:8", permutation=Permutation(np.arange(17), None))


@pytest.mark.parametrize("k, n, v, m", CASES[:2])
def test_compress_and_matmul_with_permutation_equal_dense_math(k, n, v, m):
  kernel = _kernel(k, n, seed=11)
  config = VNMConfig(v, 2, m)
  p = ps.find_permutation(kernel, config)
  assert p.inputs is not None and p.outputs is not None
  mask = vnm_mask(kernel, config, permutation=p)
  w = compress(kernel, config, permutation=p)
  np.testing.assert_array_equal(np.asarray(decompress(w)), np.asarray(kernel * mask))
  x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
  expected = np.dot(x.astype(np.float64), np.asarray(kernel * mask, np.float64))
  assert_close(vnm_matmul(jnp.asarray(x), w, implementation="xla"), expected, rtol=1e-4)


def _swiglu(x, gate, up, down):
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def test_fold_keeps_a_swiglu_mlp_function():
  d, f = 32, 40
  gate, up, down = _kernel(d, f, 1), _kernel(d, f, 2), _kernel(f, d, 3)
  config = VNMConfig(8, 2, 5)
  p_up = ps.find_permutation(up, config)
  p_down = ps.find_permutation(down, config)
  up_mask = vnm_mask(up, config, permutation=p_up)
  folded = fold_output_permutation(up, down, p_up, siblings=(gate,),
                                   consumer_permutation=p_down)
  (folded_gate,) = folded.siblings
  # The folded up kernel prunes to the same mask, reordered, with no output permutation.
  assert folded.producer_permutation.outputs is None
  folded_mask = vnm_mask(folded.producer, config, permutation=folded.producer_permutation)
  np.testing.assert_array_equal(np.asarray(folded_mask),
                                np.asarray(up_mask)[:, _order(p_up.outputs, f)])
  w_up = compress(folded.producer, config, permutation=folded.producer_permutation)
  assert w_up.output_index is None
  # The consumer's own mask is the same set of weights after the fold.
  down_mask = np.asarray(vnm_mask(down, config, permutation=p_down))
  folded_down_mask = np.asarray(vnm_mask(folded.consumer, config,
                                         permutation=folded.consumer_permutation))
  order = _order(p_up.outputs, f)
  np.testing.assert_array_equal(folded_down_mask, down_mask[order])
  # The pruned model computes the same function before and after the fold.
  x = np.random.default_rng(0).standard_normal((6, d)).astype(np.float32)
  before = _swiglu(x, gate, up * up_mask, down * down_mask)
  hidden = jax.nn.silu(x @ folded_gate) * vnm_matmul(jnp.asarray(x), w_up, implementation="xla")
  after = hidden @ (folded.consumer * folded_down_mask)
  assert_close(after, before, rtol=2e-4)


def test_fold_keeps_an_mlp_with_bias():
  d, f = 32, 40
  up, down = _kernel(d, f, 4), _kernel(f, d, 5)
  bias = np.random.default_rng(1).standard_normal(f).astype(np.float32)
  p = ps.find_permutation(up, "8:2:5")
  folded = fold_output_permutation(up, down, p, producer_bias=bias)
  x = np.random.default_rng(2).standard_normal((4, d))
  relu = lambda h: np.maximum(h, 0)
  before = relu(x @ up + bias) @ down
  after = (relu(x @ np.asarray(folded.producer, np.float64) + np.asarray(folded.producer_bias))
           @ np.asarray(folded.consumer, np.float64))
  np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9)


def _attention_out(x, v_kernel, o_kernel, weights, kv_heads, groups, head_dim):
  """Grouped-query attention's value path: per query head, weights @ values, then o."""
  values = (x @ v_kernel).reshape(x.shape[0], kv_heads, head_dim)
  heads = [weights[h] @ values[:, h // groups] for h in range(kv_heads * groups)]
  return jnp.concatenate(heads, axis=-1) @ o_kernel


def test_fold_v_into_o_with_grouped_query_attention():
  tokens, d, kv_heads, groups, head_dim = 5, 16, 2, 3, 8
  rng = np.random.default_rng(0)
  v_kernel = _kernel(d, kv_heads * head_dim, 7)
  o_kernel = _kernel(kv_heads * groups * head_dim, d, 8)
  weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((kv_heads * groups, tokens, tokens))))
  # A head-preserving output order: features move only inside their head.
  outputs = np.concatenate([h * head_dim + rng.permutation(head_dim) for h in range(kv_heads)])
  p = Permutation(rng.permutation(d), outputs)
  folded = fold_output_permutation(v_kernel, o_kernel, p, head_dim=head_dim,
                                   query_groups=groups)
  x = rng.standard_normal((tokens, d)).astype(np.float32)
  before = _attention_out(x, v_kernel, o_kernel, weights, kv_heads, groups, head_dim)
  after = _attention_out(x, folded.producer, folded.consumer, weights, kv_heads, groups, head_dim)
  assert_close(after, before, rtol=1e-5)
  across = Permutation(None, np.roll(np.arange(kv_heads * head_dim), 1))
  with pytest.raises(ValueError, match="moves features across attention heads"):
    fold_output_permutation(v_kernel, o_kernel, across, head_dim=head_dim, query_groups=groups)


def test_fold_rejects_mismatched_shapes():
  up, down = _kernel(8, 16), _kernel(16, 8)
  p = Permutation(None, np.arange(16)[::-1].copy())
  with pytest.raises(ValueError, match="consumer must have 16 input rows"):
    fold_output_permutation(up, down.T, p)
  with pytest.raises(ValueError, match=r"producer_bias must have shape \(16,\)"):
    fold_output_permutation(up, down, p, producer_bias=np.zeros(8))
  with pytest.raises(ValueError, match="siblings\\[0\\] must be a 2D kernel with 16 outputs"):
    fold_output_permutation(up, down, p, siblings=(np.zeros((8, 8)),))
  with pytest.raises(ValueError, match="query_groups > 1 needs head_dim"):
    fold_output_permutation(up, np.zeros((32, 8)), p, query_groups=2)


def _array(leaf):
  return np.asarray(leaf[...] if isinstance(leaf, nnx.Variable) else leaf)


class _Mlp(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(32, 40, rngs=rngs)
    self.down = nnx.Linear(40, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)


def test_tree_permutations_feed_tree_masks():
  state = nnx.state(_Mlp(nnx.Rngs(0)))
  permutations, table = ps.tree_permutations(state, "8:2:5", progress=False)
  assert set(permutations) == {"up/kernel", "down/kernel"}
  masks = tree_masks(state, "8:2:5", permutations=permutations)
  for path, module_kernel, mask in (("up/kernel", state["up"]["kernel"], masks["up"]["kernel"]),
                                    ("down/kernel", state["down"]["kernel"],
                                     masks["down"]["kernel"])):
    kernel = _array(module_kernel)
    expected = vnm_mask(kernel, "8:2:5", permutation=permutations[path])
    np.testing.assert_array_equal(_array(mask), np.asarray(expected))
  by_path = {layer.path: layer for layer in table.layers}
  for layer in table.layers:
    assert layer.kept_permuted >= layer.kept_identity
    assert layer.kept_unstructured >= layer.kept_permuted
    assert 0 <= layer.gap_closed <= 1
  text = str(table)
  assert "up/kernel" in text and "gap closed" in text and "mean gap closed" in text
  assert by_path["up/kernel"].shape == (32, 40)


def test_tree_permutations_on_a_linen_dict_with_given_scores():
  rng = np.random.default_rng(0)
  params = {"params": {"dense": {"kernel": _kernel(42, 30), "bias": np.zeros(30)},
                       "embed": {"embedding": rng.standard_normal((50, 42))}}}
  scores = {"dense/kernel": rng.random((42, 30)).astype(np.float32)}
  permutations, table = ps.tree_permutations(params, "8:2:8", scores=scores, progress=False)
  assert list(permutations) == ["params/dense/kernel"]
  (layer,) = table.layers
  assert layer.kept_identity == pytest.approx(ps.kept_score(scores["dense/kernel"], "8:2:8"))
  assert layer.kept_permuted > layer.kept_identity
