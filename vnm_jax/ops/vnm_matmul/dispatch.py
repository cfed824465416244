"""Which formulation runs a V:N:M matmul of a given token count: tables shipped with the op.

The XLA (CPU) table is measured (bench/RESULTS.md, "Kernel (issue 9)"); the Pallas (GPU)
table is an UNMEASURED default until a GPU run of ``bench/gpu_kernels.py`` writes its
crossover file (:func:`pallas_table_from_crossover` reads it into this module's format).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

from vnm_jax.config import VNMConfig


@dataclasses.dataclass(frozen=True)
class XLAChoice:
  """One XLA formulation (:mod:`vnm_jax.ops.vnm_matmul.xla`).

  Attributes:
    formulation: "batched" (one gather, one batched dot) or "blocks" (``lax.map`` over
      row blocks, x transposed and gathered by rows).
    blocks_per_step: row blocks per ``lax.map`` step ("blocks").
  """

  formulation: str
  blocks_per_step: int = 0


# (largest token count, choice), in increasing token counts; the last entry takes the
# rest. Measured on 2 AMD EPYC cores, float32, 4096x4096 at 64:2:8 and 64:2:5 (see
# bench/RESULTS.md, "Kernel (issue 9)"): 8 blocks a step won at 4-16 tokens, 2 at 64-256.
XLA_CPU_TABLE: tuple[tuple[int | None, XLAChoice], ...] = (
    (2, XLAChoice("batched")),
    (32, XLAChoice("blocks", blocks_per_step=8)),
    (None, XLAChoice("blocks", blocks_per_step=2)),
)

# The batched formulation also wins while its gathered x, (R, 4G, T) elements, stays
# this small (1 MiB of float32, within the caches): small weights (SmolLM2's 576-wide
# projections) take it up to ~37 tokens, where a lax.map's per-step cost is not repaid;
# a 4096x4096 weight at 4 tokens (2 MiB) ran 0.75x of dense batched, 0.87x in blocks.
XLA_BATCHED_MAX_ELEMENTS = 1 << 18

# Largest token count that runs the Pallas decode kernel (more run the prefill kernel),
# by config; "default" for configs without an entry. UNMEASURED: no GPU has timed the
# two kernels against each other yet (A2's suggestion: decode up to 64 tokens).
PALLAS_DECODE_MAX_TOKENS: dict[str, int] = {"default": 64}
PALLAS_TABLE_MEASURED = False


def choose_xla(tokens: int, condensed_rows: int | None = None) -> XLAChoice:
  """The XLA formulation for ``tokens`` rows of x.

  ``condensed_rows`` is R * 4G of the weight (its gathered x has that many rows per
  token); if given, the batched formulation takes every call whose gathered x has at
  most :data:`XLA_BATCHED_MAX_ELEMENTS` elements. :data:`XLA_CPU_TABLE` decides the rest.
  """
  if condensed_rows is not None and tokens * condensed_rows <= XLA_BATCHED_MAX_ELEMENTS:
    return XLAChoice("batched")
  for max_tokens, choice in XLA_CPU_TABLE:
    if max_tokens is None or tokens <= max_tokens:
      return choice
  raise AssertionError("XLA_CPU_TABLE must end with a None entry.")


def choose_pallas(tokens: int, config: VNMConfig,
                  table: Mapping[str, int] | None = None) -> str:
  """"decode" or "prefill" for ``tokens`` rows of x at ``config``."""
  table = PALLAS_DECODE_MAX_TOKENS if table is None else table
  limit = table.get(str(config), table["default"])
  return "decode" if tokens <= limit else "prefill"


def pallas_table_from_crossover(path: str) -> dict[str, int]:
  """A :data:`PALLAS_DECODE_MAX_TOKENS` dict from a GPU crossover file.

  The file is the ``crossover_<dtype>.json`` that ``bench/gpu_kernels.py`` writes:
  ``{"crossover": {"64:2:8": {"decode_max_tokens": 48, ...}, ...}}``. The default
  entry becomes the smallest measured limit (the safe side for unmeasured configs).
  """
  with open(path) as f:
    crossover = json.load(f)["crossover"]
  table = {config: int(entry["decode_max_tokens"]) for config, entry in crossover.items()
           if entry.get("decode_max_tokens") is not None}
  if not table:
    raise ValueError(f"{path} has no decode_max_tokens entry.")
  table["default"] = min(table.values())
  return table
