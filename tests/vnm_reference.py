"""Slow, independent numpy references for V:N:M masks and structure (loops over blocks)."""

import itertools

import numpy as np


def _blocks(k, n, v, m):
  for g0 in range(0, k, m):
    for r0 in range(0, n, v):
      yield range(g0, min(g0 + m, k)), range(r0, min(r0 + v, n))


def _top2_rows(scores, mask, columns, rows):
  for j in rows:
    ranked = sorted(columns, key=lambda i: (-scores[i, j], i))
    for i in ranked[:2]:
      mask[i, j] = True


def column_l1_mask(scores, v, m):
  """Paper rule: per block the 4 columns with the largest L1, then top-2 per row."""
  scores = np.asarray(scores, np.float64)
  k, n = scores.shape
  mask = np.zeros((k, n), bool)
  for columns, rows in _blocks(k, n, v, m):
    l1 = {i: sum(scores[i, j] for j in rows) for i in columns}
    kept = sorted(columns, key=lambda i: (-l1[i], i))[:4]
    _top2_rows(scores, mask, kept, rows)
  return mask


def exhaustive_mask(scores, v, m):
  """VENOM rule: per block the 4-column subset keeping the most score after 2:4."""
  scores = np.asarray(scores, np.float64)
  k, n = scores.shape
  mask = np.zeros((k, n), bool)
  for columns, rows in _blocks(k, n, v, m):
    best, best_subset = -np.inf, None
    # A short last group: subsets range over padded positions too; only real columns count.
    for subset in itertools.combinations(range(columns.start, columns.start + m), 4):
      real = [i for i in subset if i < k]
      kept = sum(sum(sorted((scores[i, j] for i in real), reverse=True)[:2]) for j in rows)
      if kept > best:
        best, best_subset = kept, real
    _top2_rows(scores, mask, best_subset, rows)
  return mask


def structure_ok(mask, v, m):
  """Every V x M block uses <= 4 columns; every row keeps <= 2 per group."""
  mask = np.asarray(mask, bool)
  k, n = mask.shape
  for columns, rows in _blocks(k, n, v, m):
    block = mask[columns.start:columns.stop, rows.start:rows.stop]
    if block.any(axis=1).sum() > 4 or block.sum(axis=0).max(initial=0) > 2:
      return False
  return True


def kept_score(scores, mask):
  return float(np.sum(np.asarray(scores, np.float64) * np.asarray(mask)))


def assert_close(actual, expected, rtol=1e-5, err_msg=""):
  """``actual`` equals ``expected`` up to ``rtol`` of the values' magnitude.

  Each entry may differ by ``rtol * (|expected entry| + max |expected|)``: a result
  summed in another order (another CPU's SIMD width, XLA against numpy, a cached decode
  against a full forward) differs by rounding relative to the magnitude of what was
  summed, not to the entry itself, which may be near 0 after cancellation.
  """
  expected = np.asarray(expected, np.float64)
  scale = float(np.abs(expected).max()) if expected.size else 0.0
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=rtol * scale, err_msg=err_msg)
