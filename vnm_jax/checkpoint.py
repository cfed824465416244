"""Checkpoints of training state with orbax, checked on restore.

Anything that is a pytree of arrays saves: params (linen dicts, ``nnx.State``),
masks (None at dense leaves), LoRA adapters, optimizer states (including the
fixed-mask, SR-STE and three-stage LoRA states, so the masks, step and stage come
back with them), PRNG keys and compressed :class:`~vnm_jax.format.VNMWeight` trees.

Next to the arrays each step stores a manifest: the tree's structure (including
static fields such as a LoRA scale or a VNMConfig), every leaf's path, shape,
dtype and SHA-256 of its bytes. ``restore`` compares the target with the manifest
before reading and the bytes it read with the checksums after, so a checkpoint
of another model, a damaged file or a truncated save raises
:class:`CheckpointError` instead of giving a silently wrong model (orbax alone
restores a flipped byte in a data file without complaint). Checksums need every
leaf on this host: they are computed in single-process runs only.

Usage::

    with Checkpointer("/tmp/run/ckpt", max_to_keep=3) as checkpointer:
      checkpointer.save(step, {"adapters": adapters, "opt_state": opt_state, "key": key})
      ...
      target = {"adapters": adapters, "opt_state": opt_state, "key": key}  # or eval_shape
      restored = checkpointer.restore(target)             # latest step
      step = checkpointer.latest_step()

Restored arrays take the target leaves' shardings (``jax.Array`` or
``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``), so a sharded run restores
straight onto its mesh.

orbax is imported when a :class:`Checkpointer` is made, not with the package, so
``import vnm_jax`` stays light for code that never saves.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np

PyTree = Any

MANIFEST_FORMAT = "vnm_jax.checkpoint/1"
_MAX_LISTED = 8


class CheckpointError(ValueError):
  """A checkpoint is missing, damaged, or does not match the tree it is restored into."""


def _orbax():
  """``orbax.checkpoint``, imported on first use."""
  import orbax.checkpoint as ocp
  return ocp


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _dtype_name(x) -> str:
  return str(x.dtype) if hasattr(x, "dtype") else type(x).__name__


def _shape(x) -> list[int]:
  return list(np.shape(x))


def _sha256(x) -> str:
  if _is_key(x):
    x = jax.random.key_data(x)
  data = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return hashlib.sha256(data.view(np.uint8).reshape(-1).data).hexdigest()


def _describe(tree: PyTree) -> tuple[str, list[dict]]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return str(treedef), [{"path": jax.tree_util.keystr(path), "shape": _shape(leaf),
                         "dtype": _dtype_name(leaf)} for path, leaf in leaves]


def _first_difference(a: str, b: str, context: int = 60) -> str:
  index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  start = max(0, index - context)
  return (f"saved ...{a[start:index + context]}...\n  target ...{b[start:index + context]}...")


def _abstract(leaf):
  """A ShapeDtypeStruct with the sharding the restored array should have."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    if leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                  sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf  # numpy arrays and Python scalars restore as such


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """The step numbers saved in ``directory`` (oldest first), read without orbax.

  A step is a folder named by its number (an interrupted save leaves a temporary name,
  not counted); a missing ``directory`` has none and is not created.
  """
  try:
    entries = list(os.scandir(directory))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())


class Checkpointer:
  """Numbered checkpoints of one training run in ``directory`` (see the module docstring).

  Args:
    directory: where the steps are written (created if missing).
    max_to_keep: keep only the newest this many steps; None keeps all.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or
                                    not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    ocp = self._ocp = _orbax()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, step: int, tree: PyTree, *, metadata: dict | None = None) -> None:
    """Writes ``tree`` as checkpoint ``step`` (blocking until it is on disk).

    Args:
      step: a new step number (int >= 0).
      tree: any pytree of arrays (jax, numpy, typed PRNG keys) and None.
      metadata: optional JSON-serialisable dict stored with it (see :meth:`metadata`).
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be an int >= 0, got {step!r}.")
    step = int(step)
    if step in self._manager.all_steps():
      raise CheckpointError(f"step {step} already exists in {self.directory}; steps are "
                            f"written once.")
    treedef, leaves = _describe(tree)
    checksums = jax.process_count() == 1
    for entry, leaf in zip(leaves, jax.tree_util.tree_leaves(tree)):
      entry["sha256"] = _sha256(leaf) if checksums else None
    manifest = {"format": MANIFEST_FORMAT, "treedef": treedef, "leaves": leaves,
                "metadata": metadata or {}}
    args = self._ocp.args
    self._manager.save(step, args=args.Composite(state=args.StandardSave(tree),
                                                 manifest=args.JsonSave(manifest)))
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    """The saved step numbers, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def _step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory}.")
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; saved steps: "
                            f"{steps}.")
    return step

  def _manifest(self, step: int) -> dict:
    args = self._ocp.args
    try:
      manifest = self._manager.restore(
          step, args=args.Composite(manifest=args.JsonRestore()))["manifest"]
    except Exception as error:  # orbax raises many types for unreadable files
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: its "
                            f"manifest cannot be read ({type(error).__name__}: {error}).") \
          from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} has no "
                            f"{MANIFEST_FORMAT} manifest; it was not written by "
                            f"vnm_jax.checkpoint.Checkpointer or is damaged.")
    return manifest

  def metadata(self, step: int | None = None) -> dict:
    """The ``metadata`` dict saved with ``step`` (default: the latest)."""
    return self._manifest(self._step(step))["metadata"]

  def restore(self, target: PyTree, *, step: int | None = None) -> PyTree:
    """Reads checkpoint ``step`` (default: the latest) into ``target``'s structure.

    Args:
      target: a tree like the saved one: the live arrays or their
        ``jax.eval_shape`` / ``jax.ShapeDtypeStruct`` (with ``sharding`` to place
        the result). Structure, static fields, paths, shapes and dtypes must match.

    Returns:
      The saved tree, placed with the target's shardings.

    Raises:
      CheckpointError (a ValueError): no such step, the target does not match
        (every mismatching leaf is named), or the files are damaged.
    """
    step = self._step(step)
    manifest = self._manifest(step)
    self._check_target(step, manifest, target)
    abstract = jax.tree_util.tree_map(_abstract, target)
    args = self._ocp.args
    try:
      restored = self._manager.restore(
          step, args=args.Composite(state=args.StandardRestore(abstract)))["state"]
    except Exception as error:  # orbax raises many types for unreadable files
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: its "
                            f"arrays cannot be read ({type(error).__name__}: {error}).") from error
    if jax.tree_util.tree_structure(restored) != jax.tree_util.tree_structure(target):
      raise CheckpointError(f"checkpoint step {step} in {self.directory} restored a tree of "
                            f"another structure than the target's.")
    self._check_checksums(step, manifest, restored)
    return restored

  def _check_target(self, step: int, manifest: dict, target: PyTree) -> None:
    treedef, leaves = _describe(target)
    saved = manifest["leaves"]
    where = f"checkpoint step {step} in {self.directory}"
    if [e["path"] for e in saved] != [e["path"] for e in leaves]:
      saved_paths, target_paths = [e["path"] for e in saved], [e["path"] for e in leaves]
      only_saved = [p for p in saved_paths if p not in set(target_paths)][:_MAX_LISTED]
      only_target = [p for p in target_paths if p not in set(saved_paths)][:_MAX_LISTED]
      raise CheckpointError(f"{where} holds other leaves than the target: only in the "
                            f"checkpoint {only_saved}, only in the target {only_target} "
                            f"({len(saved_paths)} saved leaves, {len(target_paths)} in the "
                            f"target).")
    mismatches = [f"{s['path']}: saved {s['dtype']} {tuple(s['shape'])}, target "
                  f"{t['dtype']} {tuple(t['shape'])}"
                  for s, t in zip(saved, leaves)
                  if s["shape"] != t["shape"] or s["dtype"] != t["dtype"]]
    if mismatches:
      raise CheckpointError(f"{where} does not match the target in {len(mismatches)} leaves: "
                            + "; ".join(mismatches[:_MAX_LISTED]))
    if manifest["treedef"] != treedef:
      raise CheckpointError(f"{where} has the target's leaves but another tree structure or "
                            f"static fields (e.g. a LoRA scale, a VNMConfig, a container "
                            f"type):\n  {_first_difference(manifest['treedef'], treedef)}")

  def _check_checksums(self, step: int, manifest: dict, restored: PyTree) -> None:
    if jax.process_count() != 1:
      return
    bad = [entry["path"] for entry, leaf in zip(manifest["leaves"],
                                                jax.tree_util.tree_leaves(restored))
           if entry["sha256"] is not None and entry["sha256"] != _sha256(leaf)]
    if bad:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: the bytes "
                            f"read for {len(bad)} leaves differ from those saved: "
                            f"{bad[:_MAX_LISTED]}.")

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
