"""Balanced assignments: items into parts of fixed sizes, and parts as slot tables.

The permutation search moves output rows between V blocks and input channels between
slots with every part's size fixed: :func:`balanced_assignment` solves that
transportation problem exactly; :func:`labels_to_slots` and :func:`slots_to_labels`
convert between a part label per item and the (parts, size) member tables in which
padding items fill the last places; :func:`zigzag_deal` is the paper's start.
"""

from __future__ import annotations

import numpy as np


def labels_to_slots(labels: np.ndarray, capacities: np.ndarray, real: int, padded: int,
                    order_key: np.ndarray | None = None) -> np.ndarray:
  """Members (P, size) of each part from a label per real item (0..real-1).

  Parts hold ``capacities`` real items; the places left free (the tails of the short
  parts, which are the last ones) take the padding items real..padded-1. Within a
  part, items are sorted by ``order_key`` descending (ties by index).
  """
  parts = len(capacities)
  size = padded // parts
  members = np.empty((parts, size), np.intp)
  for part in range(parts):
    items = np.flatnonzero(labels == part)
    if order_key is not None:
      items = items[np.argsort(-order_key[items], kind="stable")]
    members[part, :len(items)] = items
    members[part, len(items):] = -1
  padding = iter(range(real, padded))
  for part, slot in zip(*np.nonzero(members == -1)):
    members[part, slot] = next(padding)
  return members


def slots_to_labels(members: np.ndarray, real: int) -> np.ndarray:
  labels = np.empty(real, np.intp)
  part, _ = np.nonzero(members < real)
  labels[members[members < real]] = part
  return labels


# ----------------------------------------------------------------------------------
# Balanced assignment: n items into parts of fixed sizes, maximising total benefit


def _greedy_balanced(benefit: np.ndarray, capacities: np.ndarray) -> np.ndarray:
  """Items in order of regret (best minus second-best benefit) take their best free part."""
  n, parts = benefit.shape
  ranked = np.sort(benefit, axis=1)
  regret = ranked[:, -1] - ranked[:, -2]
  preferences = np.argsort(-benefit, axis=1, kind="stable")
  left = capacities.copy()
  labels = np.empty(n, np.intp)
  for item in np.argsort(-regret, kind="stable"):
    for part in preferences[item]:
      if left[part]:
        labels[item] = part
        left[part] -= 1
        break
  return labels


def balanced_assignment(benefit: np.ndarray, capacities: np.ndarray,
                        labels: np.ndarray | None = None) -> np.ndarray:
  """Optimal labels (n,) for benefit (n, P), part p taking exactly capacities[p] items.

  A transportation problem with few parts. Start from ``labels`` (or, when None, a
  regret-greedy deal) and cancel positive cycles of moves between parts until none
  is left, which is the optimality condition. Edge a -> b of the part graph carries
  the best gain of moving one item of a to b. Every pass first applies all disjoint
  positive swaps (2-cycles) at once, best first; when none is left, Bellman-Ford
  longest paths find a longer positive cycle. Much faster here than a linear
  assignment on columns repeated per capacity (n x n).
  """
  benefit = np.asarray(benefit, np.float64)
  n, parts = benefit.shape
  if parts == 1:
    return np.zeros(n, np.intp)
  items = np.arange(n)
  labels = _greedy_balanced(benefit, capacities) if labels is None else labels.copy()
  tolerance = 1e-12 * max(1.0, float(np.abs(benefit).max()))
  for _ in range(n * parts):  # every pass gains > tolerance; this cap never binds
    gain = benefit - benefit[items, labels][:, None]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=parts)
    present = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
    sorted_gain = gain[order]
    edge = np.full((parts, parts), -np.inf)
    edge[present] = np.maximum.reduceat(sorted_gain, starts, axis=0)
    # The item achieving each edge: the first position in its part with that gain.
    hits = sorted_gain == edge[labels[order]]
    first = np.minimum.reduceat(np.where(hits, items[:, None], n), starts, axis=0)
    mover = np.zeros((parts, parts), np.intp)
    mover[present] = order[np.minimum(first, n - 1)]
    np.fill_diagonal(edge, -np.inf)
    swap_gain = np.triu(edge + edge.T, 1)
    sources, targets = np.nonzero(swap_gain > tolerance)
    if len(sources):
      busy = np.zeros(parts, bool)
      for index in np.argsort(-swap_gain[sources, targets], kind="stable"):
        a, b = sources[index], targets[index]
        if not (busy[a] or busy[b]):
          busy[a] = busy[b] = True
          labels[mover[a, b]], labels[mover[b, a]] = b, a
      continue
    distance, predecessor = np.zeros(parts), np.full(parts, -1)
    on_cycle = -1
    for step in range(parts + 1):
      candidate = distance[:, None] + edge
      best_from = np.argmax(candidate, axis=0)
      best = candidate[best_from, np.arange(parts)]
      improved = best > distance + tolerance
      if not improved.any():
        break
      distance = np.where(improved, best, distance)
      predecessor = np.where(improved, best_from, predecessor)
      if step == parts:
        on_cycle = int(np.flatnonzero(improved)[0])
    if on_cycle < 0:
      return labels
    for _ in range(parts):  # walk back until surely inside the cycle
      on_cycle = predecessor[on_cycle]
    cycle = [on_cycle]
    while (previous := predecessor[cycle[-1]]) != on_cycle:
      cycle.append(previous)
    cycle.reverse()  # edges cycle[i] -> cycle[i + 1]
    moves = [(mover[a, b], b) for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    if sum(gain[item, target] for item, target in moves) <= tolerance:
      return labels
    for item, target in moves:
      labels[item] = target
  return labels



def zigzag_deal(order: np.ndarray, capacities: np.ndarray, real: int,
                padded: int) -> np.ndarray:
  """Deal items (in ``order``) to parts in zig-zag order: 0..P-1, P-1..0, ..."""
  parts = len(capacities)
  labels = np.empty(real, np.intp)
  fill = np.zeros(parts, np.intp)
  sweep = np.concatenate([np.arange(parts), np.arange(parts)[::-1]])
  position = 0
  for item in order:
    while fill[sweep[position % len(sweep)]] >= capacities[sweep[position % len(sweep)]]:
      position += 1
    part = sweep[position % len(sweep)]
    labels[item] = part
    fill[part] += 1
    position += 1
  return labels_to_slots(labels, capacities, real, padded)


