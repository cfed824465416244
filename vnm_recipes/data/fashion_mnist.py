"""Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test grey-scale 28x28 images of
10 kinds of clothing, read from the original idx files.

Nothing is downloaded. The four files are looked for in the directory the user names
(`--data-dir`), then where the Debian/Ubuntu package `dataset-fashion-mnist` puts them
(`DEBIAN_DIR`); each may be gzip-compressed (``.gz``) or plain. Images come out as float32
(n, 28, 28, 1) with pixels scaled from 0..255 to [0, 1], labels as int32 (n,).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from vnm_recipes.data.idx import IdxFormatError, read_idx
from vnm_recipes.data.images import ImageSplit

NUM_CLASSES = 10
IMAGE_SIZE = 28
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
UPSTREAM_URL = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"
# The four files by role, as upstream names them (".gz" optional).
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The directories `find_files` looks in, in order: data_dir (if given), then `DEBIAN_DIR`."""
  return ([pathlib.Path(data_dir)] if data_dir is not None else []) + [DEBIAN_DIR]


def find_files(data_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """The paths of the four idx files, all from the first directory of `search_dirs` that
  holds all four (each as NAME.gz or NAME).

  Raises:
    FileNotFoundError: no directory holds all four; the message lists where it looked,
      what was missing, and how to get the files.
  """
  missing_by_dir = []
  for directory in search_dirs(data_dir):
    found, missing = {}, []
    for role, name in FILES.items():
      candidates = [directory / f"{name}.gz", directory / name]
      path = next((c for c in candidates if c.is_file()), None)
      if path is None:
        missing.append(f"{name}[.gz]")
      else:
        found[role] = path
    if not missing:
      return found
    missing_by_dir.append(f"{directory} (missing {', '.join(missing)})")
  raise FileNotFoundError(
      "Fashion-MNIST's idx files were not found; looked in " + "; ".join(missing_by_dir)
      + ". Get them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts "
      f"them in {DEBIAN_DIR}) or download the four .gz files from {UPSTREAM_URL} into a "
      "directory and pass it as --data-dir (data_dir=).")


def _checked(path: pathlib.Path, values: np.ndarray, ndim: int, what: str) -> np.ndarray:
  """values if they are uint8 of ndim dimensions (28x28 images); else an IdxFormatError."""
  if values.dtype != np.uint8 or values.ndim != ndim:
    raise IdxFormatError(f"{path}: Fashion-MNIST {what} must be uint8 with {ndim} dimensions, "
                         f"got {values.dtype} {values.shape}")
  if ndim == 3 and values.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise IdxFormatError(f"{path}: Fashion-MNIST images must be {IMAGE_SIZE}x{IMAGE_SIZE}, got "
                         f"{values.shape[1]}x{values.shape[2]}")
  return values


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> ImageSplit:
  """Reads the four idx files (see `find_files`) into the official 60k / 10k split.

  Args:
    data_dir: directory looked in first; None looks only at `DEBIAN_DIR`.

  Returns:
    An `ImageSplit`: images float32 (n, 28, 28, 1) in [0, 1], labels int32 (n,) in 0..9,
    in the files' order.

  Raises:
    FileNotFoundError: the files are nowhere (the message says how to get them).
    IdxFormatError (a ValueError): a file is malformed, or images and labels disagree in
      count, or a label is outside 0..9; the message names the file.
  """
  paths = find_files(data_dir)
  arrays = {}
  for half in ("train", "test"):
    images_path, labels_path = paths[f"{half}_images"], paths[f"{half}_labels"]
    images = _checked(images_path, read_idx(images_path), 3, "images")
    labels = _checked(labels_path, read_idx(labels_path), 1, "labels")
    if len(images) != len(labels):
      raise IdxFormatError(f"{labels_path}: {len(labels)} labels for the {len(images)} images "
                           f"of {images_path}")
    if labels.size and labels.max() >= NUM_CLASSES:
      raise IdxFormatError(f"{labels_path}: label {int(labels.max())} outside 0.."
                           f"{NUM_CLASSES - 1}")
    arrays[f"{half}_images"] = (images.astype(np.float32) / 255.0)[..., None]
    arrays[f"{half}_labels"] = labels.astype(np.int32)
  return ImageSplit(**arrays)
