"""scikit-learn's 8x8 handwritten digits as a fixed, stratified train/test split.

The data ships inside the scikit-learn wheel (1797 grey-scale images, 10 classes), so
nothing is downloaded. Images come out as float32 arrays of shape (n, 8, 8, 1) (NHWC,
one channel) with pixel values scaled from 0..16 to [0, 1]; labels are int32 (n,).
"""

from __future__ import annotations

import numpy as np

from vnm_recipes.data.images import ImageSplit

NUM_CLASSES = 10
IMAGE_SIZE = 8
MAX_PIXEL = 16.0  # load_digits pixel values are integers in 0..16
NUM_IMAGES = 1797


def load_digits_split(test_size: int = 360, seed: int = 0) -> ImageSplit:
  """Loads the digits and splits them, stratified by class, with a fixed seed.

  Args:
    test_size: number of test images (1 .. 1787; every class keeps at least one image
      on each side). The default 360 leaves 1437 for training.
    seed: seed of the shuffle; the same seed always gives the same split.

  Returns:
    An `ImageSplit` whose two halves are disjoint and together hold all 1797 images.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  if isinstance(test_size, bool) or not isinstance(test_size, (int, np.integer)):
    raise TypeError(f"test_size must be an int, got {type(test_size).__name__} {test_size!r}")
  if not NUM_CLASSES <= test_size <= NUM_IMAGES - NUM_CLASSES:
    raise ValueError(
        f"test_size must be in [{NUM_CLASSES}, {NUM_IMAGES - NUM_CLASSES}] so that every "
        f"class appears in both halves, got {test_size}")
  digits = load_digits()
  images = (digits.images / MAX_PIXEL).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(
      images, labels, test_size=int(test_size), stratify=labels, random_state=seed)
  return ImageSplit(train_x, train_y, test_x, test_y)
