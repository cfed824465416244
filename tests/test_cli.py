"""Tests of the `vnm-jax` command line: help, and `prune` end to end (bad arguments:
test_cli_arguments.py)."""

import jax
import numpy as np
import pytest

import vnm_reference as ref
from vnm_jax import Checkpointer, compress, decompress, path_str
from vnm_recipes import cli
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit.checkpoint import save_checkpoint
from vnm_recipes.vit.training import init_model

TINY = ViTConfig(dim=16, depth=1, num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("vit") / "ckpt"
  graphdef, params = init_model(TINY, seed=0)
  save_checkpoint(directory, TINY, params)
  return directory, params


def test_demo_help_text(capsys):
  with pytest.raises(SystemExit) as raised:
    cli.main(["demo", "--help"])
  assert raised.value.code == 0
  out = capsys.readouterr().out
  assert "--out-dir" in out and "64:2:5" in out


def test_top_level_help_lists_every_subcommand(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  for command in ("demo", "prune", "select", "bench", "vit", "llm"):
    assert command in out


def test_delegated_help_reaches_the_script(capsys):
  with pytest.raises(SystemExit) as raised:
    cli.main(["vit", "--help"])
  assert raised.value.code == 0
  assert "--preset" in capsys.readouterr().out


def test_prune_vit_checkpoint_saves_masked_params_and_compressed_weights(vit_checkpoint,
                                                                          tmp_path, capsys):
  directory, params = vit_checkpoint
  out = tmp_path / "pruned"
  assert cli.main(["prune", str(directory), "--config", "16:2:5", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "blocks/0/mlp/fc1/kernel" in printed and "16:2:5" in printed

  # Independent expectation: the numpy column-L1 mask of |W| on each block kernel.
  expected_params, expected_compressed = [], []
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  for key_path, leaf in leaves:
    path = path_str(key_path)
    kernel = np.asarray(leaf)
    if path.startswith("blocks/") and path.endswith("kernel"):
      mask = ref.column_l1_mask(np.abs(kernel), 16, 5)
      expected_params.append(np.where(mask, kernel, 0))
      expected_compressed.append(compress(kernel, "16:2:5", mask=mask))
    else:
      expected_params.append(kernel)
      expected_compressed.append(None)
  target = {"params": treedef.unflatten(expected_params),
            "compressed": treedef.unflatten(expected_compressed)}
  with Checkpointer(out) as checkpointer:
    restored = checkpointer.restore(target)
    metadata = checkpointer.metadata()
  assert metadata["config"] == "16:2:5" and metadata["score"] == "magnitude"
  for got, want in zip(jax.tree.leaves(restored["params"]), expected_params):
    np.testing.assert_array_equal(np.asarray(got), want)
  compressed = [w for w in jax.tree.leaves(restored["compressed"],
                                           is_leaf=lambda x: hasattr(x, "columns"))]
  kernels = [p for p, c in zip(expected_params, expected_compressed) if c is not None]
  assert len(compressed) == len(kernels) == 4
  for weight, kernel in zip(compressed, kernels):
    np.testing.assert_array_equal(np.asarray(decompress(weight)), kernel)


def test_prune_with_permutation_and_ria_keeps_vnm_structure(vit_checkpoint, tmp_path, capsys):
  directory, params = vit_checkpoint
  out = tmp_path / "pruned"
  assert cli.main(["prune", str(directory), "--config", "16:2:5", "--out", str(out),
                   "--score", "ria", "--permute", "--permutation-seconds", "0.2"]) == 0
  printed = capsys.readouterr().out
  assert "gap closed" in printed  # the permutation table
  with Checkpointer(out) as checkpointer:
    metadata = checkpointer.metadata()
  assert metadata["permuted"] is True and metadata["score"] == "ria"
