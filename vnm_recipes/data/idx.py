"""Reading and writing the idx format of MNIST and Fashion-MNIST (gzip-compressed or plain).

An idx file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values, big-endian, in C order.
`read_idx` checks every part of that and names the file and what is wrong; `write_idx`
writes the same format (the tests build small files with it).
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

# idx type code -> big-endian numpy dtype.
DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
  """A file that is not a well-formed idx file (the message names the file and the fault)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an idx file, gzip-compressed (detected from its first bytes) or plain.

  Args:
    path: the file.

  Returns:
    An array of the file's shape, in the native byte order of its type (uint8 for images
    and labels).

  Raises:
    FileNotFoundError: no such file.
    IdxFormatError (a ValueError): a bad magic number, an unknown type code, a zero
      dimension count, a header cut short, or a body whose size does not match the
      dimensions; the message names the file.
  """
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
      raise IdxFormatError(f"{path}: corrupt gzip data ({error})") from None
  if len(raw) < 4:
    raise IdxFormatError(f"{path}: {len(raw)} bytes, shorter than the 4-byte idx magic number")
  if raw[0] != 0 or raw[1] != 0:
    raise IdxFormatError(f"{path}: not an idx file: the magic number {raw[:4].hex()} must "
                         f"start with two zero bytes")
  code, ndim = raw[2], raw[3]
  if code not in DTYPES:
    raise IdxFormatError(f"{path}: unknown idx type code 0x{code:02x}; allowed: "
                         + ", ".join(f"0x{c:02x} ({d.name})" for c, d in DTYPES.items()))
  if ndim == 0:
    raise IdxFormatError(f"{path}: the magic number gives 0 dimensions; need at least 1")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxFormatError(f"{path}: header cut short: {ndim} dimensions need {header} bytes, "
                         f"the file has {len(raw)}")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise IdxFormatError(f"{path}: dimensions {shape} of {dtype.name} need {expected} bytes of "
                         f"data, the file has {len(raw) - header}")
  values = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, values: np.ndarray, *, compress: bool | None = None
              ) -> pathlib.Path:
  """Writes values as an idx file; gzip-compressed when compress is True (None: when the
  name ends with ".gz").

  Args:
    path: the file to write.
    values: an array of 1 to 255 dimensions whose dtype is one of `DTYPES`' (any byte
      order).
    compress: see above.

  Returns:
    The path written.
  """
  values = np.asarray(values)
  codes = {d.newbyteorder("="): c for c, d in DTYPES.items()}
  code = codes.get(values.dtype.newbyteorder("="))
  if code is None:
    raise TypeError(f"values.dtype must be one of {sorted(d.name for d in codes)}, got "
                    f"{values.dtype}")
  if not 1 <= values.ndim <= 255:
    raise ValueError(f"values must have 1 to 255 dimensions, got {values.ndim}")
  path = pathlib.Path(path)
  body = (bytes([0, 0, code, values.ndim]) + np.asarray(values.shape, ">u4").tobytes()
          + values.astype(DTYPES[code]).tobytes())
  if compress or (compress is None and path.suffix == ".gz"):
    body = gzip.compress(body)
  path.write_bytes(body)
  return path
