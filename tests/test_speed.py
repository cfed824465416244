"""Tests of vnm_recipes.speed: the `vnm-jax select` and `vnm-jax bench` commands."""

import pytest

from test_selection import _fake_timing
from vnm_recipes import speed
from vnm_recipes.models.llama import LlamaConfig, llama_gemm_shapes
from vnm_recipes.models.vit import ViTConfig


@pytest.fixture
def fake_benchmark(monkeypatch):
  """measure_matmul_speedup replaced by fixed speedups: 1.2x at M=5, 1.8x at M=8."""
  measure, calls = _fake_timing({(40, 24): 1.0, (576, 1536): 2.0}, {5: 1.2, 8: 1.8})
  from vnm_jax import benchmarking
  monkeypatch.setattr(benchmarking, "measure_matmul_speedup", measure)
  return calls


def test_cli_select_prints_table_and_choice(capsys, fake_benchmark):
  assert speed.select_main(["--shapes", "40x24,576x1536", "--candidates", "8:2:5,8:2:8",
                            "--target", "1.5", "--tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert "8:2:5" in out and "1.200x" in out and "1.800x" in out
  # Only M=8 meets 1.5x; with a lower target the more diverse 8:2:5 wins.
  assert "choice: 8:2:8" in out
  assert speed.select_main(["--shapes", "40x24", "--candidates", "8:2:5,8:2:8", "--target",
                            "1.1"]) == 0
  assert "choice: 8:2:5" in capsys.readouterr().out
  assert {(k, n) for k, n, _, _ in fake_benchmark} == {(40, 24), (576, 1536)}


def test_cli_select_reports_when_nothing_meets_target(capsys, fake_benchmark):
  assert speed.select_main(["--shapes", "40x24", "--candidates", "8:2:8", "--target",
                            "1000"]) == 1
  assert "no candidate reaches the target speedup 1000" in capsys.readouterr().out


def test_select_rejects_a_bad_tokens_argument(capsys):
  with pytest.raises(SystemExit) as raised:
    speed.select_main(["--shapes", "40x24", "--target", "1.5", "--tokens", "0"])
  assert raised.value.code == 2 and "--tokens" in capsys.readouterr().err


def test_model_shapes_of_the_recipe_models():
  assert speed.model_shapes("smollm2-135m") == llama_gemm_shapes(LlamaConfig.smollm2_135m())
  vit = ViTConfig()
  assert speed.model_shapes("vit-digits") == {
      (vit.dim, 3 * vit.dim): vit.depth, (vit.dim, vit.dim): vit.depth,
      (vit.dim, vit.mlp_dim): vit.depth, (vit.mlp_dim, vit.dim): vit.depth}
  with pytest.raises(ValueError, match="--model must be one of"):
    speed.model_shapes("gpt-17")


def test_bench_times_every_point_with_the_library(capsys):
  # Tiny shapes: checks the wiring to vnm_jax.measure_matmul_speedup, not the speed.
  assert speed.bench_main(["--shapes", "40x24", "--tokens", "4", "8", "--configs", "8:2:5",
                           "--repeats", "1"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 x 24")]
  assert [row.split(" | ")[1] for row in rows] == ["4", "8"]
  assert all(" 8:2:5 " in row and "x |" in row for row in rows)
