"""Tests of the idx reader and the Fashion-MNIST loader, on small generated files only."""

import gzip

import numpy as np
import pytest

from vnm_recipes.data import fashion_mnist, idx, images


def _header(code, dims):
  return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


# ----------------------------------------------------------------------------- idx reader

def test_read_idx_of_hand_built_files(tmp_path):
  # Built byte by byte from the format's definition, not by write_idx.
  plain = tmp_path / "u8"
  plain.write_bytes(_header(0x08, [2, 3]) + bytes(range(6)))
  values = idx.read_idx(plain)
  assert values.dtype == np.uint8
  np.testing.assert_array_equal(values, [[0, 1, 2], [3, 4, 5]])
  # Big-endian int16 (-2 is 0xfffe) and float32 (1.5 is 0x3fc00000), gzip-compressed.
  short = tmp_path / "i16.gz"
  short.write_bytes(gzip.compress(_header(0x0B, [3]) + bytes([0x01, 0x00, 0xff, 0xfe, 0, 7])))
  np.testing.assert_array_equal(idx.read_idx(short), [256, -2, 7])
  single = tmp_path / "f32"
  single.write_bytes(_header(0x0D, [1, 1]) + bytes([0x3f, 0xc0, 0, 0]))
  assert idx.read_idx(single).tolist() == [[1.5]]
  assert idx.read_idx(single).dtype.isnative


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", "<i4", "f4", ">f8"])
@pytest.mark.parametrize("name", ["a", "a.gz"])
def test_write_then_read_round_trips(tmp_path, dtype, name):
  values = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
  if values.dtype.kind == "u":
    values = np.abs(values)
  path = idx.write_idx(tmp_path / name, values)
  assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
  read = idx.read_idx(path)
  assert read.shape == values.shape and read.dtype == values.dtype.newbyteorder("=")
  np.testing.assert_array_equal(read, values)


@pytest.mark.parametrize("content, fault", [
    (b"\x00\x00\x08", "shorter than the 4-byte"),
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "two zero bytes"),
    (_header(0x07, [2]) + b"\x00\x00", "unknown idx type code 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "header cut short"),
    (_header(0x08, [2, 3]) + bytes(5), r"need 6 bytes of data, the file has 5"),
    (_header(0x0C, [2]) + bytes(12), r"need 8 bytes of data, the file has 12"),
    (b"\x1f\x8b" + b"not gzip at all", "corrupt gzip"),
])
def test_read_idx_names_the_file_and_the_fault(tmp_path, content, fault):
  path = tmp_path / "broken-idx1-ubyte"
  path.write_bytes(content)
  with pytest.raises(idx.IdxFormatError, match=fault) as raised:
    idx.read_idx(path)
  assert str(path) in str(raised.value) and isinstance(raised.value, ValueError)


def test_read_idx_of_a_truncated_gzip_file(tmp_path):
  path = tmp_path / "cut.gz"
  path.write_bytes(gzip.compress(_header(0x08, [100]) + bytes(100))[:-10])
  with pytest.raises(idx.IdxFormatError, match="corrupt gzip"):
    idx.read_idx(path)


def test_write_idx_rejects_unsupported_values(tmp_path):
  with pytest.raises(TypeError, match="values.dtype"):
    idx.write_idx(tmp_path / "x", np.zeros(3, np.int64))
  with pytest.raises(ValueError, match="dimensions"):
    idx.write_idx(tmp_path / "x", np.uint8(3))


# ----------------------------------------------------------------------------- Fashion-MNIST

def _write_split(directory, train=12, test=5, gz=(True, False, True, False), size=28,
                 labels_max=9, seed=0):
  """Generated Fashion-MNIST-format files; returns the arrays written."""
  rng = np.random.default_rng(seed)
  arrays = {"train_images": rng.integers(0, 256, (train, size, size), dtype=np.uint8),
            "train_labels": rng.integers(0, labels_max + 1, train, dtype=np.uint8),
            "test_images": rng.integers(0, 256, (test, size, size), dtype=np.uint8),
            "test_labels": rng.integers(0, labels_max + 1, test, dtype=np.uint8)}
  arrays["train_images"][0, 0, 0], arrays["train_images"][0, 0, 1] = 0, 255
  directory.mkdir(parents=True, exist_ok=True)
  for (role, name), compress in zip(fashion_mnist.FILES.items(), gz):
    idx.write_idx(directory / (name + (".gz" if compress else "")), arrays[role])
  return arrays


@pytest.fixture
def no_debian_dir(tmp_path, monkeypatch):
  """Point the package location at an empty directory (this machine may have the package)."""
  empty = tmp_path / "no-package"
  empty.mkdir()
  monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", empty)
  return empty


def test_load_fashion_mnist_from_generated_files(tmp_path, no_debian_dir):
  arrays = _write_split(tmp_path / "data")
  split = images.load_image_dataset("fashion_mnist", tmp_path / "data")
  assert split.train_images.shape == (12, 28, 28, 1) and split.test_images.shape == (5, 28, 28, 1)
  assert split.train_images.dtype == np.float32 and split.train_labels.dtype == np.int32
  np.testing.assert_allclose(split.train_images[..., 0], arrays["train_images"] / 255.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(split.test_labels, arrays["test_labels"])
  assert split.train_images.min() == 0.0 and split.train_images.max() == 1.0


def test_data_dir_first_then_the_package_location(tmp_path, monkeypatch):
  given = _write_split(tmp_path / "given", seed=1)
  package = _write_split(tmp_path / "package", seed=2)
  monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "package")
  np.testing.assert_array_equal(fashion_mnist.load_fashion_mnist(tmp_path / "given").test_labels,
                                given["test_labels"])
  # A directory lacking a file is skipped as a whole (no mixing of two copies).
  (tmp_path / "given" / "t10k-labels-idx1-ubyte").unlink()
  found = fashion_mnist.find_files(tmp_path / "given")
  assert {p.parent for p in found.values()} == {tmp_path / "package"}
  np.testing.assert_array_equal(fashion_mnist.load_fashion_mnist().test_labels,
                                package["test_labels"])


def test_missing_files_say_where_it_looked_and_how_to_get_them(tmp_path, no_debian_dir):
  _write_split(tmp_path / "data")
  (tmp_path / "data" / "train-images-idx3-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError) as raised:
    fashion_mnist.load_fashion_mnist(tmp_path / "data")
  message = str(raised.value)
  for part in (str(tmp_path / "data"), "missing train-images-idx3-ubyte[.gz]", str(no_debian_dir),
               "apt-get install dataset-fashion-mnist", "zalandoresearch/fashion-mnist",
               "--data-dir"):
    assert part in message


@pytest.mark.parametrize("changes, file, fault", [
    (dict(size=27), "train-images", "must be 28x28"),
    (dict(labels_max=10), "labels-idx1", "label 10 outside 0..9"),
])
def test_bad_contents_name_the_file(tmp_path, no_debian_dir, changes, file, fault):
  _write_split(tmp_path, **changes, seed=5)
  with pytest.raises(idx.IdxFormatError, match=fault) as raised:
    fashion_mnist.load_fashion_mnist(tmp_path)
  assert file in str(raised.value)


def test_label_count_must_match_the_images(tmp_path, no_debian_dir):
  _write_split(tmp_path)
  idx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
  with pytest.raises(idx.IdxFormatError, match="4 labels for the 5 images"):
    fashion_mnist.load_fashion_mnist(tmp_path)
  idx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((5, 1), np.uint8))
  with pytest.raises(idx.IdxFormatError, match="labels must be uint8 with 1 dimensions"):
    fashion_mnist.load_fashion_mnist(tmp_path)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="dataset must be one of"):
    images.load_image_dataset("cifar10")
