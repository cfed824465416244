"""Saving a trained ViT with `vnm_jax.Checkpointer`, and loading it back (for `vnm-jax prune`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from vnm_jax import Checkpointer
from vnm_recipes.models.vit import ViT, ViTConfig


def save_checkpoint(directory: str | os.PathLike, model_config: ViTConfig, params: Any, *,
                    dataset: str = "digits") -> None:
  """Saves a ViT's params with `vnm_jax.Checkpointer` (step 0), its config and the name of
  the data set it was trained on (`vnm_recipes.data.images.DATASETS`).

  `load_checkpoint` (and `vnm-jax prune DIR`) rebuild the model from the metadata;
  `checkpoint_dataset` reads the data set's name (calibration images must be of it).
  """
  with Checkpointer(directory) as checkpointer:
    checkpointer.save(0, {"params": params},
                      metadata={"model": "vit", "vit_config": dataclasses.asdict(model_config),
                                "dataset": dataset})


def checkpoint_dataset(directory: str | os.PathLike) -> str:
  """The data set a `save_checkpoint` checkpoint was trained on ("digits" for checkpoints
  written before the name was saved)."""
  with Checkpointer(directory) as checkpointer:
    return checkpointer.metadata().get("dataset", "digits")


def load_checkpoint(directory: str | os.PathLike) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, params) of a ViT saved by `save_checkpoint` (latest step)."""
  with Checkpointer(directory) as checkpointer:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint")
    metadata = checkpointer.metadata()
    if metadata.get("model") != "vit":
      raise ValueError(f"{directory} is not a ViT checkpoint (metadata model="
                       f"{metadata.get('model')!r}); write one with `vnm-jax vit --save DIR`")
    model_config = ViTConfig(**metadata["vit_config"])
    graphdef, target = nnx.split(nnx.eval_shape(lambda: ViT(model_config, rngs=nnx.Rngs(0))))
    return graphdef, checkpointer.restore({"params": target})["params"]
