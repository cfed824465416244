"""Tests for V/M selection: mask diversity, the two-phase sift and the measuring side."""

import math
import types

import numpy as np
import pytest

from vnm_jax import selection
from vnm_jax.selection import (mask_diversity, measure_speedups, model_gemm_shapes,
                               rank_candidates, select_vm)

# ln K(V, M) from the spec (section 2), 4 decimals.
SPEC_LOG_DIVERSITY = {(16, 5): .3785, (32, 5): .3684, (64, 5): .3634, (128, 5): .3609,
                      (16, 8): .2572, (32, 8): .2406, (64, 8): .2323, (128, 8): .2281}


@pytest.mark.parametrize("vm, expected", sorted(SPEC_LOG_DIVERSITY.items()))
def test_mask_diversity_matches_spec_table(vm, expected):
  assert mask_diversity(*vm) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("v, m", [(1, 4), (2, 6), (3, 7), (8, 10), (128, 16)])
def test_mask_diversity_is_log_of_masks_per_element(v, m):
  # Count masks of one block exactly (big integers), then take the V*M-th root.
  masks_per_block = math.comb(m, 4) * 6**v
  assert mask_diversity(v, m) == pytest.approx(math.log(masks_per_block) / (v * m), rel=1e-12)


def test_mask_diversity_rejects_bad_patterns():
  with pytest.raises(ValueError, match="m must be >= 4"):
    mask_diversity(64, 3)
  with pytest.raises(ValueError, match="v must be >= 1"):
    mask_diversity(0, 8)
  with pytest.raises(TypeError, match="v must be an int"):
    mask_diversity(64.0, 8)


def test_select_vm_takes_most_diverse_that_meets_target():
  speedups = {(64, 5): 1.25, (128, 5): 1.45, (32, 8): 1.6, (64, 8): 1.9, (128, 8): 2.1}
  # 64:2:5 is the most diverse but too slow; 128:2:5 is next and meets 1.4.
  assert select_vm(speedups, 1.4) == (128, 5)
  # Everything meets 1.2: the most diverse wins even though it is the slowest.
  assert select_vm(speedups, 1.2) == (64, 5)
  # Only M=8 candidates reach 1.8; among them smaller V is more diverse.
  assert select_vm(speedups, 1.8) == (64, 8)
  # Exactly at the target counts as meeting it.
  assert select_vm(speedups, 2.1) == (128, 8)


def test_select_vm_agrees_with_brute_force_on_random_tables():
  rng = np.random.default_rng(0)
  pairs = [(v, m) for v in (16, 32, 64, 128) for m in range(5, 11)]
  for _ in range(50):
    chosen = rng.choice(len(pairs), size=6, replace=False)
    speedups = {pairs[i]: float(rng.uniform(0.8, 3.0)) for i in chosen}
    target = float(rng.uniform(0.8, 2.5))
    meeting = [vm for vm, s in speedups.items() if s >= target]
    if not meeting:
      with pytest.raises(ValueError, match="no candidate reaches"):
        select_vm(speedups, target)
      continue
    best = max(meeting, key=lambda vm: (math.log(math.comb(vm[1], 4)) + vm[0] * math.log(6))
               / (vm[0] * vm[1]))
    assert select_vm(speedups, target) == best


def test_select_vm_errors_are_clear():
  with pytest.raises(ValueError, match=r"no candidate reaches the target speedup 3.*128:2:8 at 2.100x"):
    select_vm({(64, 8): 1.9, (128, 8): 2.1}, 3.0)
  with pytest.raises(ValueError, match="speedups is empty"):
    select_vm({}, 1.5)
  with pytest.raises(TypeError, match=r"keys must be \(v, m\) tuples"):
    select_vm({"64:2:8": 2.0}, 1.5)
  with pytest.raises(ValueError, match="finite positive"):
    select_vm({(64, 8): float("nan")}, 1.5)
  with pytest.raises(ValueError, match="m must be >= 4"):
    select_vm({(64, 2): 2.0}, 1.5)
  with pytest.raises(ValueError, match="target must be a finite positive"):
    select_vm({(64, 8): 2.0}, -1.0)
  with pytest.raises(TypeError, match="speedups must be a mapping"):
    select_vm([((64, 8), 2.0)], 1.5)


def test_rank_candidates_and_table():
  speedups = {(64, 8): 1.9, (64, 5): 1.3}
  ranked = rank_candidates(speedups, 1.5)
  assert [(c.v, c.m) for c in ranked] == [(64, 5), (64, 8)]
  assert [c.meets_target for c in ranked] == [False, True]
  table = selection.format_candidates(ranked, 1.5, choice=(64, 8))
  lines = table.splitlines()
  assert any("64:2:8" in line and "<==" in line for line in lines)
  assert not any("64:2:5" in line and "<==" in line for line in lines)


def _fake_timing(dense_by_shape, ratio_by_m):
  """A measure function: dense time by shape, V:N:M time = dense / ratio_by_m[m]."""
  calls = []

  def measure(k, n, tokens, config, *, dtype, implementation, repeats):
    calls.append((k, n, tokens, str(config)))
    dense = dense_by_shape[(k, n)]
    return types.SimpleNamespace(dense_seconds=dense, vnm_seconds=dense / ratio_by_m[config.m])

  return measure, calls


def test_measure_speedups_weights_shapes_by_count():
  dense = {(576, 1536): 3.0, (1536, 576): 1.0}
  # Per-shape speedups differ, so the weighting matters: 576x1536 at 2x, 1536x576 at 1x.
  def measure(k, n, tokens, config, *, dtype, implementation, repeats):
    per_shape = {(576, 1536): 2.0, (1536, 576): 1.0}[(k, n)]
    return types.SimpleNamespace(dense_seconds=dense[(k, n)],
                                 vnm_seconds=dense[(k, n)] / per_shape)

  got = measure_speedups({(576, 1536): 2, (1536, 576): 1}, ["64:2:8"], tokens=16,
                         progress=False, measure=measure)
  # total dense = 2*3 + 1 = 7; total vnm = 2*1.5 + 1 = 4.
  assert got == {(64, 8): pytest.approx(7 / 4)}


def test_measure_speedups_feeds_select_vm():
  measure, calls = _fake_timing({(64, 128): 1.0}, {5: 1.2, 8: 1.8})
  speedups = measure_speedups([(64, 128)], ["32:2:5", (32, 8), "64:2:8"], tokens=8,
                              progress=False, measure=measure)
  assert speedups == {(32, 5): pytest.approx(1.2), (32, 8): pytest.approx(1.8),
                      (64, 8): pytest.approx(1.8)}
  assert {c[3] for c in calls} == {"32:2:5", "32:2:8", "64:2:8"}
  assert all(c[2] == 8 for c in calls)
  assert select_vm(speedups, 1.5) == (32, 8)


def test_measure_speedups_rejects_bad_input():
  measure, _ = _fake_timing({(8, 8): 1.0}, {8: 1.0})
  with pytest.raises(ValueError, match="gemm_shapes is empty"):
    measure_speedups([], ["8:2:8"], 4, progress=False, measure=measure)
  with pytest.raises(ValueError, match=r"\(in_features, out_features\) tuples"):
    measure_speedups([(8, 0)], ["8:2:8"], 4, progress=False, measure=measure)
  with pytest.raises(ValueError, match="candidates is empty"):
    measure_speedups([(8, 8)], [], 4, progress=False, measure=measure)


def test_measure_speedups_with_the_real_benchmark():
  # Tiny shapes: checks the wiring to vnm_jax.benchmarking, not the speed.
  speedups = measure_speedups([(40, 24)], ["8:2:5"], tokens=4, repeats=1, progress=False)
  assert set(speedups) == {(8, 5)}
  assert math.isfinite(speedups[(8, 5)]) and speedups[(8, 5)] > 0


def test_model_gemm_shapes_counts_selected_kernels():
  params = {"params": {
      "embed": {"embedding": np.zeros((100, 16))},
      "block_0": {"up": {"kernel": np.zeros((16, 64)), "bias": np.zeros(64)},
                  "down": {"kernel": np.zeros((64, 16))}},
      "block_1": {"up": {"kernel": np.zeros((16, 64))}, "down": {"kernel": np.zeros((64, 16))},
                  "norm": {"scale": np.zeros(16)}},
      "head": {"kernel": np.zeros((16, 10))},
  }}
  assert model_gemm_shapes(params) == {(16, 64): 2, (64, 16): 2}
  assert model_gemm_shapes(params, filter=r"up/kernel$") == {(16, 64): 2}
  with pytest.raises(ValueError, match="no kernel of params is selected"):
    model_gemm_shapes(params, filter="nothing-matches")
