"""Settings of the LLM recipe's runs: three-stage LoRA and the command defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vnm_recipes.checks import check_positive_ints

DEFAULT_RESULTS = Path("runs/llm/results.jsonl")
PERMUTE_CHOICES = {"no": (False,), "yes": (True,), "both": (False, True)}
MASK_SCORES = ("wanda", "ria", "magnitude")


@dataclasses.dataclass(frozen=True)
class LoRASettings:
  """Three-stage LoRA run.

  Attributes:
    steps: optimizer steps in all; stages 1 + 2 take `search_share` of them, split evenly.
    batch_size: sequences per step.
    sequence_length: tokens per training sequence.
    rank: LoRA rank r.
    alpha: LoRA scale numerator (scale = alpha / rank).
    learning_rate: peak AdamW learning rate (linear warm-up over 10 % of the steps, then
      cosine decay to 10 %).
    weight_decay: AdamW weight decay on the adapters.
    update_every: k, steps between mask recomputations in stage 2.
    regularization: lambda of stage 2 on the entries the previous mask pruned.
    search_share: share of the steps spent in stages 1 + 2 (the paper: at most 0.1).
    mask_score: "wanda", "ria" or "magnitude": the importance the stage-2/3 masks rank the
      entries of W + s*a@b by (`vnm_jax.three_stage_lora(score=...)`).
    seed: seed of the adapters' init and of the batch positions.
  """

  steps: int = 60
  batch_size: int = 4
  sequence_length: int = 256
  rank: int = 8
  alpha: float = 16.0
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  update_every: int = 2
  regularization: float = 2e-4
  search_share: float = 0.1
  mask_score: str = "wanda"
  seed: int = 0

  def __post_init__(self):
    check_positive_ints(self, ("steps", "batch_size", "rank", "update_every"))
    if self.steps < 2:
      raise ValueError(f"LoRASettings.steps must be >= 2 (stage 1 and stage 2 take one step "
                       f"each at least), got {self.steps}")
    if isinstance(self.sequence_length, bool) or not isinstance(self.sequence_length, int) \
        or self.sequence_length < 2:
      raise ValueError(f"LoRASettings.sequence_length must be an int >= 2, got "
                       f"{self.sequence_length!r}")
    if not 0.0 <= self.search_share <= 1.0:
      raise ValueError(f"LoRASettings.search_share must be in [0, 1], got {self.search_share!r}")
    if self.mask_score not in MASK_SCORES:
      raise ValueError(f"LoRASettings.mask_score must be one of {MASK_SCORES}, got "
                       f"{self.mask_score!r}")

  def stage_steps(self) -> tuple[int, int]:
    """(dense_steps, dynamic_steps): stages 1 and 2, at least one step each."""
    search = min(self.steps - 1, max(2, round(self.search_share * self.steps)))
    dense = max(1, search // 2)
    return dense, max(1, search - dense)
