"""Checkpointing: bit-exact resume mid-stage-2, VNMWeight trees, and clear errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vnm_jax.checkpoint import Checkpointer, CheckpointError
from vnm_jax.config import VNMConfig
from vnm_jax.format import VNMWeight, compress, decompress
from vnm_jax.lora import init_lora, lora_params, three_stage_lora
from vnm_jax.permutation import Permutation
from vnm_jax.sparse_training import sparse_params, sr_ste
from vnm_jax.trees import tree_configs

CONFIG = VNMConfig(8, 2, 6)
TOTAL, DENSE, DYNAMIC = 14, 3, 6  # stage 2 is steps 3..8


def make_base(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense1": {"kernel": jnp.asarray(rng.standard_normal((37, 21)), jnp.float32),
                     "bias": jnp.zeros(21, jnp.float32)},
          "dense2": {"kernel": jnp.asarray(rng.standard_normal((21, 9)), jnp.float32)}}


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return jnp.mean((h @ params["dense2"]["kernel"] - y) ** 2)


def make_run():
  base = make_base()
  tx = three_stage_lora(optax.adamw(3e-2, weight_decay=0.01), tree_configs(base, CONFIG),
                        total_steps=TOTAL, dense_steps=DENSE, dynamic_steps=DYNAMIC,
                        update_every=2)

  @jax.jit
  def step(base, adapters, opt_state, key):
    # The batch comes from the run's key: the key must be restored too.
    key, data_key = jax.random.split(key)
    x = jax.random.normal(data_key, (16, 37))
    y = jnp.sin(x[:, :9])
    loss, grads = jax.value_and_grad(
        lambda ad: loss_fn(lora_params(base, ad, opt_state), x, y))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
    return optax.apply_updates(adapters, updates), opt_state, key, loss

  def fresh():
    adapters = init_lora(jax.random.key(1), base, rank=4, alpha=8.0)
    return {"base": base, "adapters": adapters, "opt_state": tx.init(adapters),
            "key": jax.random.key(2)}

  return fresh, step


def run(step, train, start, stop):
  losses = []
  for _ in range(start, stop):
    adapters, opt_state, key, loss = step(train["base"], train["adapters"], train["opt_state"],
                                          train["key"])
    train = {**train, "adapters": adapters, "opt_state": opt_state, "key": key}
    losses.append(np.asarray(loss))
  return train, losses


def test_resume_mid_stage_two_gives_bit_identical_losses(tmp_path):
  fresh, step = make_run()
  _, uninterrupted = run(step, fresh(), 0, TOTAL)
  final_uninterrupted, _ = run(step, fresh(), 0, TOTAL)

  stop_at = 6
  train, first_losses = run(step, fresh(), 0, stop_at)
  assert int(train["opt_state"].stage) == 2 and int(train["opt_state"].mask_changes) >= 1
  with Checkpointer(tmp_path / "ckpt") as checkpointer:
    checkpointer.save(stop_at, train, metadata={"note": "mid stage 2"})

  # A new process would rebuild the target from scratch: shapes only.
  target = jax.eval_shape(fresh)
  with Checkpointer(tmp_path / "ckpt") as checkpointer:
    assert checkpointer.latest_step() == stop_at
    assert checkpointer.metadata() == {"note": "mid stage 2"}
    restored = checkpointer.restore(target)
  assert int(restored["opt_state"].stage) == 2
  assert int(restored["opt_state"].step) == stop_at
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      (restored["adapters"], restored["opt_state"], jax.random.key_data(restored["key"])),
      (train["adapters"], train["opt_state"], jax.random.key_data(train["key"])))
  resumed, later_losses = run(step, restored, stop_at, TOTAL)
  losses = np.array(first_losses + later_losses)
  assert losses.tobytes() == np.array(uninterrupted).tobytes()
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      (resumed["adapters"], resumed["opt_state"].masks),
      (final_uninterrupted["adapters"], final_uninterrupted["opt_state"].masks))


def test_sr_ste_state_round_trips(tmp_path):
  params = make_base(3)
  tx = sr_ste(optax.adam(1e-2), tree_configs(params, CONFIG))
  state = tx.init(params)
  grads = jax.grad(lambda p: loss_fn(sparse_params(p, state), jnp.ones((4, 37)),
                                     jnp.zeros((4, 9))))(params)
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(1, {"params": params, "opt_state": state})
    restored = checkpointer.restore({"params": params, "opt_state": state})
  np.testing.assert_array_equal(restored["opt_state"].masks["dense1"]["kernel"],
                                state.masks["dense1"]["kernel"])
  assert restored["opt_state"].masks["dense1"]["bias"] is None
  assert int(restored["opt_state"].step) == 1


def compressed_tree():
  rng = np.random.default_rng(4)
  kernel = jnp.asarray(rng.standard_normal((37, 21)), jnp.float32)
  permutation = Permutation(inputs=jnp.asarray(rng.permutation(37)),
                            outputs=jnp.asarray(rng.permutation(21)))
  return {"plain": compress(kernel, CONFIG), "permuted": compress(kernel, CONFIG,
                                                                 permutation=permutation),
          "bias": jnp.ones(21, jnp.bfloat16)}


def test_compressed_vnm_weights_round_trip(tmp_path):
  tree = compressed_tree()
  assert tree["plain"].output_index is None and tree["permuted"].output_index is not None
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(0, tree)
    restored = checkpointer.restore(jax.eval_shape(compressed_tree))
  for name in ("plain", "permuted"):
    assert restored[name].config == CONFIG and restored[name].shape == (37, 21)
    np.testing.assert_array_equal(np.asarray(decompress(restored[name])),
                                  np.asarray(decompress(tree[name])))
    assert restored[name].meta.dtype == jnp.uint8
  assert restored["bias"].dtype == jnp.bfloat16


def test_restore_onto_a_mesh_takes_the_target_sharding(tmp_path):
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  tree = {"kernel": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)}
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(0, tree)
    restored = checkpointer.restore(
        {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharding)})
  assert restored["kernel"].sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_array_equal(np.asarray(restored["kernel"]), np.asarray(tree["kernel"]))


def test_mismatched_target_raises_clear_errors(tmp_path):
  base = make_base()
  adapters = init_lora(jax.random.key(0), base, rank=4, alpha=8.0)
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(0, {"adapters": adapters, "vnm": compressed_tree()["plain"]})

  other_rank = init_lora(jax.random.key(0), base, rank=8, alpha=16.0)
  with pytest.raises(CheckpointError, match=r"\['adapters'\]\['dense1'\]\['kernel'\]\.a: saved "
                                            r"float32 \(37, 4\), target float32 \(37, 8\)"):
    checkpointer.restore({"adapters": other_rank, "vnm": compressed_tree()["plain"]})
  other_scale = init_lora(jax.random.key(0), base, rank=4, alpha=4.0)  # same shapes
  with pytest.raises(CheckpointError, match="static fields"):
    checkpointer.restore({"adapters": other_scale, "vnm": compressed_tree()["plain"]})
  other_dtype = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), adapters)
  with pytest.raises(CheckpointError, match="saved float32 \\(37, 4\\), target bfloat16"):
    checkpointer.restore({"adapters": other_dtype, "vnm": compressed_tree()["plain"]})
  other_config = compress(base["dense1"]["kernel"], VNMConfig(16, 2, 6))
  with pytest.raises(CheckpointError, match=r"\['vnm'\]\.values: saved"):
    checkpointer.restore({"adapters": adapters, "vnm": other_config})
  with pytest.raises(CheckpointError, match=r"only in the checkpoint \[\"\['vnm'\]"):
    checkpointer.restore({"adapters": adapters})
  with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
    checkpointer.restore({"adapters": adapters}, step=3)
  with pytest.raises(CheckpointError, match="already exists"):
    checkpointer.save(0, {"adapters": adapters})
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    Checkpointer(tmp_path / "empty").restore({"adapters": adapters})
  checkpointer.close()


def test_reading_never_creates_the_directory(tmp_path):
  missing = tmp_path / "run" / "ckpt"
  with Checkpointer(missing) as checkpointer:
    assert checkpointer.latest_step() is None and checkpointer.all_steps() == []
    with pytest.raises(CheckpointError, match=f"checkpoint folder {missing} does not exist"):
      checkpointer.restore({"x": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match="does not exist"):
      checkpointer.metadata()
    assert not (tmp_path / "run").exists()
    checkpointer.save(0, {"x": jnp.zeros(2)})  # the first save creates it
  assert (missing / "0").is_dir()


def _save_two_leaves(directory):
  rng = np.random.default_rng(5)
  tree = {"a": {"kernel": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
          "b": jnp.arange(10.0)}
  with Checkpointer(directory) as checkpointer:
    checkpointer.save(0, tree)
  files = [os.path.join(root, name) for root, _, names in os.walk(directory / "0" / "state")
           for name in names]
  return tree, max(files, key=os.path.getsize)  # the largest file holds ['a']['kernel']


def _damage(path, how):
  data = bytearray(open(path, "rb").read())
  if how == "truncated":
    data = data[:len(data) // 2]
  elif how == "flipped":
    data[len(data) // 2] ^= 0xFF
  if how == "missing":
    os.remove(path)
  else:
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how, problem", [("truncated", "is truncated"),
                                          ("flipped", "differs from the saved file"),
                                          ("missing", "is missing")])
def test_damaged_step_names_the_step_the_file_and_the_leaf(tmp_path, how, problem):
  tree, largest = _save_two_leaves(tmp_path)
  _damage(largest, how)
  with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError) as raised:
    checkpointer.restore(tree)
  message = str(raised.value)
  assert message.count("\n") == 0 and len(message) < 400, message
  assert message.startswith(f"checkpoint step 0 in {tmp_path} is damaged: file ")
  assert f"{os.path.relpath(largest, tmp_path / '0')} {problem}" in message
  assert message.endswith("leaves that cannot be read intact: ['a']['kernel'].")


def test_damaged_manifest_or_file_list_is_named(tmp_path):
  tree, _ = _save_two_leaves(tmp_path)
  manifest = tmp_path / "0" / "manifest" / "metadata"
  _damage(manifest, "truncated")
  with Checkpointer(tmp_path) as checkpointer:
    for read in (checkpointer.metadata, lambda: checkpointer.restore(tree)):
      with pytest.raises(CheckpointError, match=r"step 0 .* damaged: file manifest/metadata is "
                                                r"truncated .*\(the manifest"):
        read()
  (tmp_path / "0" / "vnm_jax_files.json").write_text("{not json")
  with Checkpointer(tmp_path) as checkpointer:
    with pytest.raises(CheckpointError, match="file list vnm_jax_files.json cannot be read"):
      checkpointer.restore(tree)


def test_truncated_step_leaves_no_traceback_at_exit(tmp_path):
  # orbax leaves reads pending on a closed event loop when one fails: the file list keeps
  # a damaged step from reaching it, so nothing prints "Event loop is closed" at exit.
  tree, largest = _save_two_leaves(tmp_path)
  _damage(largest, "truncated")
  script = ("import jax.numpy as jnp\n"
            "from vnm_jax import Checkpointer, CheckpointError\n"
            f"with Checkpointer({str(tmp_path)!r}) as c:\n"
            "  try:\n"
            "    c.restore({'a': {'kernel': jnp.zeros((64, 64))}, 'b': jnp.zeros(10)})\n"
            "  except CheckpointError as error:\n"
            "    print(error)\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": root}, timeout=120, check=True)
  assert "is truncated" in done.stdout
  assert "Traceback" not in done.stderr and "Event loop" not in done.stderr, done.stderr


def test_a_step_without_file_list_still_reports_damage_in_one_line(tmp_path):
  tree, largest = _save_two_leaves(tmp_path)
  os.remove(tmp_path / "0" / "vnm_jax_files.json")  # as written before the list existed
  _damage(largest, "flipped")
  with Checkpointer(tmp_path) as checkpointer:
    with pytest.raises(CheckpointError) as raised:
      checkpointer.restore(tree)
  message = str(raised.value)
  assert "\n" not in message and "step 0" in message
  assert "['a']['kernel']" in message or "a.kernel" in message, message


@pytest.mark.skipif(not hasattr(VNMWeight, "validate"),
                    reason="VNMWeight.validate (issue 9) has not landed")
def test_restored_vnm_weight_is_validated(tmp_path):
  weight = compressed_tree()["plain"]
  leaves, treedef = jax.tree_util.tree_flatten(weight)
  columns = next(i for i, leaf in enumerate(leaves) if leaf is weight.columns)
  leaves[columns] = jnp.full_like(weight.columns, 10_000)  # out of range, saved as is
  damaged = jax.tree_util.tree_unflatten(treedef, leaves)
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(0, {"w": damaged})
    with pytest.raises(CheckpointError, match=r"damaged VNMWeight at \['w'\]: .*columns"):
      checkpointer.restore({"w": weight})


def test_restore_runs_each_vnm_weights_own_check(tmp_path, monkeypatch):
  checked = []

  def validate(weight):
    checked.append(weight.shape)
    raise ValueError("VNMWeight.columns[0, 1, 2] = 99 is out of range")

  tree = compressed_tree()
  with Checkpointer(tmp_path) as checkpointer:
    checkpointer.save(0, tree)
    monkeypatch.setattr(VNMWeight, "validate", validate, raising=False)
    with pytest.raises(CheckpointError, match=r"step 0 in .* holds a damaged VNMWeight at "
                                              r"\['permuted'\]: VNMWeight.columns\[0, 1, 2\]"):
      checkpointer.restore(tree)
  assert checked == [(37, 21)]  # the first weight in tree order; the error stops there
