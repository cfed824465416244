"""Image classification splits shared by the recipes' data sets, their batches, and loading
one by name.

Every data set comes out as an `ImageSplit` of float32 NHWC images with pixels in [0, 1]
and int32 labels: scikit-learn's 8x8 digits (`vnm_recipes.data.digits`, embedded in the
scikit-learn wheel) and Fashion-MNIST (`vnm_recipes.data.fashion_mnist`, 28x28, read
from its idx files).
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

import numpy as np

DATASETS = ("digits", "fashion_mnist")


class ImageSplit(NamedTuple):
  """A train/test split of an image classification data set.

  Attributes:
    train_images: float32 (n_train, height, width, channels), pixels in [0, 1].
    train_labels: int32 (n_train,), classes 0 .. num_classes - 1.
    test_images: float32 (n_test, height, width, channels), pixels in [0, 1].
    test_labels: int32 (n_test,).
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load_image_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageSplit:
  """The named data set's fixed split.

  Args:
    name: one of `DATASETS`: "digits" (1437 train / 360 test, 8x8) or "fashion_mnist"
      (60000 / 10000, 28x28).
    data_dir: where Fashion-MNIST's idx files are looked for first (see
      `vnm_recipes.data.fashion_mnist.find_files`); the digits ignore it.
  """
  if name == "digits":
    from vnm_recipes.data.digits import load_digits_split
    return load_digits_split()
  if name == "fashion_mnist":
    from vnm_recipes.data.fashion_mnist import load_fashion_mnist
    return load_fashion_mnist(data_dir)
  raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                    rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields shuffled full batches of one epoch; the last partial batch is dropped.

  Dropping it keeps every batch the same shape (one jit compilation). Each epoch
  reshuffles, so over epochs every image is seen.

  Args:
    images: (n, ...) array.
    labels: (n,) array.
    batch_size: images per batch, 1 <= batch_size <= n.
    rng: numpy generator that draws the epoch's order.

  Yields:
    (images[idx], labels[idx]) with idx of length batch_size.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"images and labels must have the same length, got {n} and {len(labels)}")
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}] (number of images), got {batch_size}")
  order = rng.permutation(n)
  for start in range(0, n - batch_size + 1, batch_size):
    idx = order[start:start + batch_size]
    yield images[idx], labels[idx]
