"""bench/generation.py --small: it runs, writes its record, and sparse = masked dense tokens."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
  spec = importlib.util.spec_from_file_location("generation_bench", ROOT / "bench" / "generation.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def record(tmp_path_factory):
  out = tmp_path_factory.mktemp("generation")
  code = _bench().main(["--device", "gpu", "--small", "--dtype", "float32",
                        "--configs", "64:2:8", "--batch-sizes", "1", "--layers", "1",
                        "--prompt-tokens", "8", "--decode-prompt-tokens", "8",
                        "--new-tokens", "4", "--repeats", "2", "--out-dir", str(out)])
  assert code == 0
  assert (out / "generation.md").read_text().count("| 64:2:8 |") == 1
  return json.loads((out / "generation.json").read_text())


def test_record_has_the_run_and_the_machine(record):
  assert record["complete"] and record["rounds"] == 2
  assert record["command"].startswith("python bench/generation.py --device gpu --small")
  for key in ("load_at_start", "load_at_timing_start", "load_at_end"):
    assert len(record[key]) == 3
  assert record["llama_config"]["num_layers"] == 1 and record["dtype"] == "float32"
  # prefill doubles as the batch-1 short run (same prompt length): no short_b1 program.
  assert [w["name"] for w in record["workloads"]] == ["prefill", "long_b1"]


def test_sparse_generates_the_masked_dense_tokens(record):
  sparse = record["models"][1]
  assert sparse["name"] == "64:2:8" and sparse["tokens_equal"] and record["tokens_equal"]
  long = sparse["tokens"]["long_b1"]
  assert long["equal"] and long["common_prefix"] == 5 and long["token_agreement"] == 1.0


def test_ratios_and_limits_are_reported(record):
  dense, sparse = record["models"]
  assert dense["name"] == "dense" and "speedup_vs_dense" not in dense
  assert set(sparse["speedup_vs_dense"]) <= {"prefill", "decode_b1"}
  assert "prefill" in sparse["speedup_vs_dense"]
  limits = sparse["limits"]
  # 64:2:8 keeps 1/4 of the pruned weights: both limits above 1, the FLOPs one under 2.
  assert 1.0 < limits["prefill_flops"] < 2.0
  assert limits["decode_streamed_bytes"] > 1.0 and limits["decode_resident_bytes"] > 1.0
  assert sparse["bytes"]["vnm_layers"] == 7
  assert sparse["bytes"]["resident"] < dense["bytes"]["resident"]
  for model in record["models"]:
    assert len(model["times"]["long_b1"]) == 2
    assert model["first_call_seconds"]["prefill"] > 0


def test_gpu_defaults_refuse_a_cpu_without_small():
  bench = _bench()
  if bench.jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(SystemExit):
    bench.parse_args(["--device", "gpu"])


def test_decode_last_only_is_the_last_row_of_the_full_logits():
  # generate_greedy's prefill asks for the last token's logits only (the head on one token).
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from vnm_recipes.models.llama import Llama, LlamaConfig

  model = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=16), rngs=nnx.Rngs(0))
  tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  full, full_cache = model.decode(tokens, model.init_cache(2, 8))
  last, last_cache = model.decode(tokens, model.init_cache(2, 8), last_only=True)
  assert last.shape == (2, 1, 64)
  np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0,
                             atol=1e-5 * float(jnp.abs(full).max()))  # float32, scaled
  np.testing.assert_array_equal(last_cache.layers[0].keys, full_cache.layers[0].keys)
