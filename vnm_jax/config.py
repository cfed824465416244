"""The V:N:M sparsity pattern: which entries of a weight matrix may be non-zero."""

from __future__ import annotations

import dataclasses
import math

# Sparse tensor cores run 2:4 on the columns a V x M block keeps, so N is fixed at 2
# and every block keeps exactly 4 of its M input columns.
KEPT_COLUMNS = 4
SUPPORTED_N = 2
# V does not change a 2:4 mask; for "2:4" it only sets the compressed format's row-block size.
DEFAULT_2TO4_V = 64


@dataclasses.dataclass(frozen=True)
class VNMConfig:
  """A V:N:M pattern for a Flax kernel of shape (in_features, out_features).

  The kernel is cut into blocks of V output features (axis 1) x M input features
  (axis 0). Each block keeps the same 4 input columns for all its V rows, and each
  row keeps N=2 of those 4 entries, so the density is 2/M. M=4 is plain 2:4
  sparsity along the input axis; V has no effect there.

  Attributes:
    v: rows (output features) per block, >= 1.
    n: kept entries per row among the 4 kept columns; must be 2.
    m: input features per block, >= 4.
  """

  v: int
  n: int
  m: int

  def __post_init__(self):
    for name in ("v", "n", "m"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VNMConfig.{name} must be an int, got {value!r} "
                        f"({type(value).__name__}).")
    if self.n != SUPPORTED_N:
      raise ValueError(f"VNMConfig.n must be {SUPPORTED_N} (2:4 on the kept columns), got "
                       f"{self.n} in {self.v}:{self.n}:{self.m}.")
    if self.m < KEPT_COLUMNS:
      raise ValueError(f"VNMConfig.m must be >= {KEPT_COLUMNS}, got {self.m} in "
                       f"{self.v}:{self.n}:{self.m}.")
    if self.v < 1:
      raise ValueError(f"VNMConfig.v must be >= 1, got {self.v} in {self.v}:{self.n}:{self.m}.")

  @classmethod
  def parse(cls, text: str | VNMConfig) -> VNMConfig:
    """Parses "V:N:M" (e.g. "64:2:8"); "2:4" means 64:2:4. A VNMConfig passes through."""
    if isinstance(text, cls):
      return text
    if not isinstance(text, str):
      raise TypeError(f"config must be a VNMConfig or a string like '64:2:8', got {text!r}.")
    parts = text.strip().split(":")
    try:
      numbers = [int(p) for p in parts]
    except ValueError:
      numbers = None
    if numbers is None or len(numbers) not in (2, 3):
      raise ValueError(f"config must look like 'V:N:M' (e.g. '64:2:8') or 'N:M' ('2:4'), "
                       f"got {text!r}.")
    if len(numbers) == 2:
      numbers = [DEFAULT_2TO4_V, *numbers]
    return cls(*numbers)

  @property
  def density(self) -> float:
    """Fraction of entries kept: n / m."""
    return self.n / self.m

  @property
  def is_2to4(self) -> bool:
    """True when the pattern is plain 2:4 (M = 4: every column of a group is kept)."""
    return self.m == KEPT_COLUMNS

  @property
  def column_subsets(self) -> int:
    """C(M, 4): the number of ways a block can choose its kept columns."""
    return math.comb(self.m, KEPT_COLUMNS)

  def __str__(self) -> str:
    return f"{self.v}:{self.n}:{self.m}"
