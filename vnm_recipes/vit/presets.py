"""The sizes of the ViT pruning pipeline: `PipelinePreset` and the named `PRESETS`."""

from __future__ import annotations

import dataclasses

from vnm_jax import VNMConfig
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
  """Sizes of one `run_pipeline` run.

  Attributes:
    name: label written into the results.
    model: the ViT's sizes.
    dense: settings of the dense training.
    finetune: settings of the fixed-mask and SR-STE fine-tuning (from the dense weights).
    configs: the V:N:M configs, as "V:N:M" strings ("2:4" is 64:2:4).
    permutation_seconds: time budget of each kernel's permutation search.
    train_images: train on only the first this many training images (None: all 1437).
    speed_batch: images per inference batch whose GEMMs are timed (tokens = batch * 17).
    speed_repeats: timed runs of each matmul (the median is kept).
  """

  name: str
  model: ViTConfig = ViTConfig()
  dense: TrainConfig = TrainConfig()
  finetune: TrainConfig = TrainConfig(epochs=25, learning_rate=1e-3)
  configs: tuple[str, ...] = ("2:4", "64:2:5", "64:2:8")
  permutation_seconds: float = 2.0
  train_images: int | None = None
  speed_batch: int = 128
  speed_repeats: int = 10

  def __post_init__(self):
    if not self.configs:
      raise ValueError("PipelinePreset.configs must name at least one V:N:M config")
    for text in self.configs:
      VNMConfig.parse(text)
    if self.train_images is not None and not 1 <= self.train_images:
      raise ValueError(f"PipelinePreset.train_images must be >= 1 or None, got "
                       f"{self.train_images!r}")


PRESETS = {
    # `vnm-jax demo`: a few minutes on 2 idle CPU cores.
    "short": PipelinePreset(
        name="short", dense=TrainConfig(epochs=25),
        finetune=TrainConfig(epochs=6, learning_rate=1e-3), configs=("64:2:5", "64:2:8"),
        permutation_seconds=0.5, speed_batch=64, speed_repeats=5),
    "full": PipelinePreset(name="full"),
}
