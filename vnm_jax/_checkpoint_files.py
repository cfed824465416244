"""The file list of a checkpoint step: every file's size and SHA-256, checked before reading.

:class:`vnm_jax.checkpoint.Checkpointer` writes it next to a finished step
(``<step>/vnm_jax_files.json``) and compares the files on disk with it before orbax
reads anything: a truncated, changed or missing file is named before orbax trips over
it (orbax's own error is a TensorStore spec of some 60 lines that names no file, and a
read that fails among many concurrent ones leaves tasks on a closed event loop, which
print "Event loop is closed" tracebacks at exit).
"""

from __future__ import annotations

import hashlib
import json
import os

FILE_LIST = "vnm_jax_files.json"
FILE_LIST_FORMAT = "vnm_jax.checkpoint.files/1"
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as source:
    for chunk in iter(lambda: source.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _walk(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) for name in names
                if name != FILE_LIST)


def write_file_list(step_dir: str) -> None:
  """Records every file under ``step_dir`` (size, SHA-256); written atomically."""
  files = {path: [os.path.getsize(os.path.join(step_dir, path)),
                  _sha256(os.path.join(step_dir, path))] for path in _walk(step_dir)}
  temporary = os.path.join(step_dir, FILE_LIST + ".tmp")
  with open(temporary, "w") as sink:
    json.dump({"format": FILE_LIST_FORMAT, "files": files}, sink)
  os.replace(temporary, os.path.join(step_dir, FILE_LIST))


def read_file_list(step_dir: str) -> dict[str, list] | None:
  """{path: [size, sha256]} of a step, or None when it has no list (an older checkpoint).

  Raises:
    ValueError: the list is there but cannot be read.
  """
  path = os.path.join(step_dir, FILE_LIST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as source:
      listing = json.load(source)
    if listing.get("format") != FILE_LIST_FORMAT:
      raise ValueError(f"format {listing.get('format')!r}")
    return dict(listing["files"])
  except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
    raise ValueError(f"its file list {FILE_LIST} cannot be read ({error})") from None


def damaged_files(step_dir: str, listing: dict[str, list]) -> dict[str, str]:
  """{path: what is wrong} of the listed files that are missing, resized or changed."""
  problems = {}
  for path, (size, sha256) in listing.items():
    full = os.path.join(step_dir, path)
    if not os.path.isfile(full):
      problems[path] = "is missing"
      continue
    actual = os.path.getsize(full)
    if actual < size:
      problems[path] = f"is truncated ({actual} of {size} bytes)"
    elif actual > size:
      problems[path] = f"has {actual} bytes, {size} were saved"
    elif _sha256(full) != sha256:
      problems[path] = "differs from the saved file (same size, other SHA-256)"
  return problems
