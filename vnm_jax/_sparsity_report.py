"""The table :func:`vnm_jax.trees.sparsity_summary` returns: densities of a masked model."""

from __future__ import annotations

import dataclasses

from vnm_jax.config import VNMConfig


@dataclasses.dataclass(frozen=True)
class LayerDensity:
  """One masked leaf: ``kept`` of ``size`` entries survive."""

  path: str
  shape: tuple[int, ...]
  config: VNMConfig | None
  kept: int
  size: int

  @property
  def density(self) -> float:
    return self.kept / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class SparsitySummary:
  """Densities of a masked model: per masked leaf, over masked leaves, over all params.

  ``str(summary)`` and :meth:`to_markdown` give a markdown table.
  """

  layers: tuple[LayerDensity, ...]
  dense_leaves: int
  dense_size: int

  @property
  def masked_kept(self) -> int:
    return sum(layer.kept for layer in self.layers)

  @property
  def masked_size(self) -> int:
    return sum(layer.size for layer in self.layers)

  @property
  def masked_density(self) -> float:
    """Kept fraction over the masked leaves only."""
    return self.masked_kept / self.masked_size if self.masked_size else 1.0

  @property
  def total_size(self) -> int:
    return self.masked_size + self.dense_size

  @property
  def total_density(self) -> float:
    """Kept fraction over all parameters, dense leaves counting as fully kept."""
    return (self.masked_kept + self.dense_size) / self.total_size if self.total_size else 1.0

  def to_markdown(self) -> str:
    rows = [("path", "shape", "config", "kept", "size", "density")]
    for layer in self.layers:
      rows.append((layer.path, "x".join(map(str, layer.shape)),
                   "-" if layer.config is None else str(layer.config), f"{layer.kept:,}",
                   f"{layer.size:,}", f"{layer.density:.4f}"))
    rows.append((f"masked ({len(self.layers)} leaves)", "", "", f"{self.masked_kept:,}",
                 f"{self.masked_size:,}", f"{self.masked_density:.4f}"))
    rows.append((f"all params ({len(self.layers) + self.dense_leaves} leaves)", "", "",
                 f"{self.masked_kept + self.dense_size:,}", f"{self.total_size:,}",
                 f"{self.total_density:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.to_markdown()
