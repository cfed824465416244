"""The sizes of the ViT pruning pipeline: `PipelinePreset` and the named `PRESETS`."""

from __future__ import annotations

import dataclasses

from vnm_jax import VNMConfig
from vnm_recipes.data.images import DATASETS
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
  """Sizes of one `run_pipeline` run.

  Attributes:
    name: label written into the results.
    dataset: one of `vnm_recipes.data.images.DATASETS`; the model's image_size and
      channels must match its images.
    model: the ViT's sizes.
    dense: settings of the dense training (its seed is replaced by each of `seeds`).
    finetune: settings of the fixed-mask and SR-STE fine-tuning (from the dense weights)
      and of the same-budget dense training (its seed is replaced too).
    configs: the V:N:M configs, as "V:N:M" strings ("2:4" is 64:2:4).
    seeds: one full run (dense training, every variant) per seed; the table reports the
      mean and standard deviation over them.
    permutation_seconds: time budget of each kernel's permutation search.
    train_images: train on only the first this many training images (None: all).
    speed_batch: images per inference batch whose GEMMs are timed.
    speed_repeats: timed runs of each matmul (the median is kept).
  """

  name: str
  dataset: str = "digits"
  model: ViTConfig = ViTConfig()
  dense: TrainConfig = TrainConfig()
  finetune: TrainConfig = TrainConfig(epochs=25, learning_rate=1e-3)
  configs: tuple[str, ...] = ("2:4", "64:2:5", "64:2:8")
  seeds: tuple[int, ...] = (0,)
  permutation_seconds: float = 2.0
  train_images: int | None = None
  speed_batch: int = 128
  speed_repeats: int = 10

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f"PipelinePreset.dataset must be one of {DATASETS}, got {self.dataset!r}")
    if not self.configs:
      raise ValueError("PipelinePreset.configs must name at least one V:N:M config")
    for text in self.configs:
      VNMConfig.parse(text)
    if (not self.seeds or len(set(self.seeds)) != len(self.seeds)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds)):
      raise ValueError(f"PipelinePreset.seeds must be distinct ints >= 0, at least one, got "
                       f"{self.seeds!r}")
    if self.train_images is not None and not 1 <= self.train_images:
      raise ValueError(f"PipelinePreset.train_images must be >= 1 or None, got "
                       f"{self.train_images!r}")

  def settings(self) -> dict:
    """What a seed's results depend on (all but name and seeds), JSON-ready: a saved seed
    is reused only by a preset with the same settings."""
    settings = dataclasses.asdict(self)
    del settings["name"], settings["seeds"]
    for train in (settings["dense"], settings["finetune"]):
      del train["seed"]
    settings["configs"] = list(self.configs)
    return settings


# 28x28 Fashion-MNIST images in 7x7 patches: 17 tokens, as the digits model's.
FASHION_MNIST_VIT = ViTConfig(image_size=28, patch_size=7, dim=64, depth=4, num_heads=4,
                              mlp_dim=256)

PRESETS = {
    # `vnm-jax demo`: under 3 minutes on 2 idle CPU cores.
    "short": PipelinePreset(
        name="short", dense=TrainConfig(epochs=25),
        finetune=TrainConfig(epochs=6, learning_rate=1e-3), configs=("64:2:5", "64:2:8"),
        permutation_seconds=0.5, speed_batch=64, speed_repeats=5),
    # The digits at full length (the earlier "full" preset), on three seeds.
    "digits": PipelinePreset(name="digits", seeds=(0, 1, 2)),
    # Fashion-MNIST, three seeds, sized to about 2 hours on 2 CPU cores (bench/RESULTS.md).
    "full": PipelinePreset(
        name="full", dataset="fashion_mnist", model=FASHION_MNIST_VIT,
        dense=TrainConfig(epochs=30, batch_size=128, learning_rate=2e-3),
        finetune=TrainConfig(epochs=5, batch_size=128, learning_rate=1e-3),
        configs=("64:2:5", "64:2:8"), seeds=(0, 1, 2)),
}
