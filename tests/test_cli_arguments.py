"""Every command-line entry point with bad arguments: exit status 2, one line naming the
argument, no traceback, before any model is loaded or anything is timed or trained.

Each entry point's ``main(argv)`` runs in-process (fast); the functions that do the
expensive work are replaced by ones that fail the test if called. Two subprocess runs
check the real exit status and the absence of a traceback.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

import vnm_jax
from test_gguf import CONFIG as GGUF_CONFIG
from test_gguf import random_gguf_tensors, write_gguf
from vnm_recipes import cli
from vnm_recipes import gguf as vnm_gguf
from vnm_recipes.llm import cli as llm_cli
from vnm_recipes.models.vit import ViTConfig
from vnm_recipes.vit import cli as vit_cli
from vnm_recipes.vit.checkpoint import save_checkpoint
from vnm_recipes.vit.training import init_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECONDS_PER_CASE = 5.0


def _bench_main(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
  module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BENCH = {name: _bench_main(name) for name in ("masks", "permutation", "training")}

# entry point -> (main, the program name its messages must show)
ENTRY_POINTS = {
    "vnm-jax": (cli.main, "vnm-jax"),
    "llm": (llm_cli.main, "python -m vnm_recipes.llm"),
    "vit": (vit_cli.main, "python -m vnm_recipes.vit"),
    "bench/masks": (BENCH["masks"].main, "python bench/masks.py"),
    "bench/permutation": (BENCH["permutation"].main, "python bench/permutation.py"),
    "bench/training": (BENCH["training"].main, "python bench/training.py"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Paths the cases name: {placeholder: path}."""
  root = tmp_path_factory.mktemp("cli_arguments")
  tiny = ViTConfig(dim=16, depth=1, num_heads=2, mlp_dim=32)
  save_checkpoint(root / "vit_ckpt", tiny, init_model(tiny, seed=0)[1])
  with vnm_jax.Checkpointer(root / "other_ckpt") as checkpointer:
    checkpointer.save(0, {"x": jnp.zeros(3)}, metadata={"model": "resnet"})
  (root / "notes.txt").write_text("not a model\n")
  (root / "notes.gguf").write_text("not a model\n")
  (root / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
  (root / "exists.safetensors").write_bytes(b"")
  (root / "empty_dir").mkdir()
  (root / "bad.jsonl").write_text('{"recipe": "dense"\n')
  (root / "partial.jsonl").write_text('{"recipe": "dense"}\n')
  write_gguf(root / "tiny.gguf", GGUF_CONFIG, random_gguf_tensors(GGUF_CONFIG))
  write_gguf(root / "gpt2.gguf", GGUF_CONFIG, random_gguf_tensors(GGUF_CONFIG),
             architecture="gpt2")
  return {"{ckpt}": root / "vit_ckpt", "{other_ckpt}": root / "other_ckpt",
          "{text}": root / "notes.txt", "{fake_gguf}": root / "notes.gguf",
          "{short_gguf}": root / "short.gguf", "{tiny_gguf}": root / "tiny.gguf", "{gpt2_gguf}": root / "gpt2.gguf",
          "{exists}": root / "exists.safetensors", "{dir}": root / "empty_dir",
          "{missing}": root / "missing" / "file.gguf", "{new}": root / "new_output",
          "{bad_jsonl}": root / "bad.jsonl", "{partial_jsonl}": root / "partial.jsonl"}


def _fail(what):
  def called(*args, **kwargs):
    raise AssertionError(f"{what} ran before the arguments were checked")
  return called


@pytest.fixture(autouse=True)
def no_expensive_work(monkeypatch, tmp_path):
  """Loading a model, calibrating, timing or training fails the test; no SmolLM2 is found."""
  monkeypatch.setattr(vnm_gguf, "load_llama", _fail("load_llama"))
  for name in ("measure_speedups", "measure_matmul_speedup", "collect_input_norms"):
    monkeypatch.setattr(vnm_jax, name, _fail(name))
  monkeypatch.setattr(llm_cli, "collect_input_norms", _fail("collect_input_norms"))
  for name in ("train_dense", "run_pipeline", "load_image_dataset"):
    monkeypatch.setattr(vit_cli, name, _fail(name))
  # This machine may have the Debian package's Fashion-MNIST; CI machines do not.
  monkeypatch.setattr("vnm_recipes.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no_fashion_mnist")
  monkeypatch.setattr("vnm_recipes.vit.checkpoint.load_checkpoint", _fail("load_checkpoint"))
  monkeypatch.setattr(BENCH["masks"], "time_mask", _fail("time_mask"))
  monkeypatch.setattr(BENCH["permutation"], "load_layers", _fail("load_layers"))
  monkeypatch.setattr(BENCH["training"], "full_model_modes", _fail("full_model_modes"))
  monkeypatch.setenv(vnm_gguf.CACHE_DIR_ENV, str(tmp_path / "empty_cache"))
  monkeypatch.delenv(vnm_gguf.SMOLLM2_GGUF_ENV, raising=False)


P = ["prune", "{ckpt}", "--config", "64:2:8", "--out", "{new}"]  # a good `vnm-jax prune`
SEL = ["select", "--shapes", "64x64", "--target", "1.5"]  # a good `vnm-jax select`

CASES = [
    # (entry point, argv, the argument the message must name)
    ("vnm-jax", [], "COMMAND"),
    ("vnm-jax", ["frobnicate"], "COMMAND"),
    ("vnm-jax", ["demo", "--preset", "huge"], "--preset"),
    ("vnm-jax", ["demo", "--out-dir", "{text}"], "--out-dir"),
    ("vnm-jax", ["demo", "--out-dir", "{text}/runs"], "--out-dir"),
    ("vnm-jax", ["demo", "--epochs", "3"], "--epochs"),
    # prune: the source
    ("vnm-jax", ["prune", "{missing}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{text}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{fake_gguf}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{short_gguf}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{dir}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{gpt2_gguf}", "--config", "64:2:8", "--out", "{new}"], "source"),
    ("vnm-jax", ["prune", "{other_ckpt}", "--config", "64:2:8", "--out", "{new}"], "source"),
    # prune: the options
    ("vnm-jax", P[:2] + ["--out", "{new}"], "--config"),
    ("vnm-jax", P[:4], "--out"),
    ("vnm-jax", P[:2] + ["--config", "64:3:8", "--out", "{new}"], "--config"),
    ("vnm-jax", P[:2] + ["--config", "64:2:3", "--out", "{new}"], "--config"),
    ("vnm-jax", P[:2] + ["--config", "0:2:8", "--out", "{new}"], "--config"),
    ("vnm-jax", P[:2] + ["--config", "sparse", "--out", "{new}"], "--config"),
    ("vnm-jax", P[:4] + ["--out", "{text}"], "--out"),
    ("vnm-jax", P[:4] + ["--out", "{ckpt}"], "--out"),
    ("vnm-jax", P[:4] + ["--out", "{text}/sub"], "--out"),
    ("vnm-jax", P + ["--score", "l2"], "--score"),
    ("vnm-jax", P + ["--rule", "greedy"], "--rule"),
    ("vnm-jax", P + ["--permutation-seconds", "-1"], "--permutation-seconds"),
    ("vnm-jax", P + ["--permutation-seconds", "nan"], "--permutation-seconds"),
    ("vnm-jax", P + ["--permutation-seconds", "0"], "--permutation-seconds"),
    ("vnm-jax", P + ["--filter", "(unclosed"], "--filter"),
    ("vnm-jax", P + ["--filter", "no_such_layer"], "--filter"),
    ("vnm-jax", P + ["--calibration-windows", "0"], "--calibration-windows"),
    ("vnm-jax", ["prune", "{tiny_gguf}", "--config", "8:2:5", "--out", "{new}", "--score",
                 "wanda", "--calibration-windows", "100000"], "--calibration-windows"),
    # select
    ("vnm-jax", SEL[:3], "--target"),
    ("vnm-jax", ["select", "--target", "1.5"], "--model"),
    ("vnm-jax", SEL[:3] + ["--target", "-1"], "--target"),
    ("vnm-jax", SEL[:3] + ["--target", "0"], "--target"),
    ("vnm-jax", SEL[:3] + ["--target", "nan"], "--target"),
    ("vnm-jax", SEL[:3] + ["--target", "fast"], "--target"),
    ("vnm-jax", ["select", "--shapes", "64x0", "--target", "1.5"], "--shapes"),
    ("vnm-jax", ["select", "--shapes", "64x", "--target", "1.5"], "--shapes"),
    ("vnm-jax", ["select", "--shapes", "64x64,", "--target", "1.5"], "--shapes"),
    ("vnm-jax", ["select", "--model", "gpt-17", "--target", "1.5"], "--model"),
    ("vnm-jax", SEL + ["--model", "vit-digits"], "--model"),
    ("vnm-jax", SEL + ["--tokens", "0"], "--tokens"),
    ("vnm-jax", SEL + ["--tokens", "-16"], "--tokens"),
    ("vnm-jax", SEL + ["--candidates", "64:3:8"], "--candidates"),
    ("vnm-jax", SEL + ["--candidates", "64:2:8,,2:4"], "--candidates"),
    ("vnm-jax", SEL + ["--candidates", ""], "--candidates"),
    ("vnm-jax", SEL + ["--repeats", "0"], "--repeats"),
    ("vnm-jax", SEL + ["--dtype", "int8"], "--dtype"),
    ("vnm-jax", SEL + ["--implementation", "cuda"], "--implementation"),
    # bench
    ("vnm-jax", ["bench"], "--model"),
    ("vnm-jax", ["bench", "--shapes", "0x64"], "--shapes"),
    ("vnm-jax", ["bench", "--shapes", "64x64", "--configs", "1:2:3"], "--configs"),
    ("vnm-jax", ["bench", "--shapes", "64x64", "--tokens", "16", "0"], "--tokens"),
    ("vnm-jax", ["bench", "--shapes", "64x64", "--repeats", "-1"], "--repeats"),
    # vit, through vnm-jax and alone
    ("vnm-jax", ["vit", "--epochs", "0"], "--epochs"),
    ("vnm-jax", ["vit", "--epochs", "many"], "--epochs"),
    ("vit", ["--batch-size", "0"], "--batch-size"),
    ("vit", ["--batch-size", "5000"], "--batch-size"),
    ("vit", ["--learning-rate", "-1e-3"], "--learning-rate"),
    ("vit", ["--learning-rate", "nan"], "--learning-rate"),
    ("vit", ["--weight-decay", "inf"], "--weight-decay"),
    ("vit", ["--warmup-fraction", "1"], "--warmup-fraction"),
    ("vit", ["--label-smoothing", "-0.1"], "--label-smoothing"),
    ("vit", ["--max-shift", "-1"], "--max-shift"),
    ("vit", ["--dropout", "1.5"], "--dropout"),
    ("vit", ["--dim", "30"], "--dim"),
    ("vit", ["--num-heads", "3"], "--num-heads"),
    ("vit", ["--patch-size", "3"], "--patch-size"),
    ("vit", ["--depth", "0"], "--depth"),
    ("vit", ["--dim", "36", "--num-heads", "8"], "--num-heads"),
    ("vit", ["--seed", "-1"], "--seed"),
    ("vit", ["--preset", "huge"], "--preset"),
    ("vit", ["--save", "{text}"], "--save"),
    ("vit", ["--save", "{ckpt}"], "--save"),
    ("vit", ["--preset", "short", "--out-dir", "{text}"], "--out-dir"),
    ("vit", ["--seeds", "0"], "--seeds"),  # needs --preset
    ("vit", ["--resume"], "--resume"),
    ("vit", ["--preset", "short", "--seeds", "0,x"], "--seeds"),
    ("vit", ["--preset", "short", "--seeds", "-1"], "--seeds"),
    ("vit", ["--preset", "short", "--seeds", "1,1"], "--seeds"),
    ("vit", ["--preset", "short", "--seeds", "0,,1"], "--seeds"),
    ("vit", ["--dataset", "cifar10"], "--dataset"),
    ("vit", ["--preset", "short", "--dataset", "digits"], "--dataset"),
    ("vit", ["--data-dir", "{missing}"], "--data-dir"),
    ("vit", ["--data-dir", "{text}"], "--data-dir"),
    ("vit", ["--preset", "full", "--data-dir", "{dir}"], "--data-dir"),  # no idx files
    ("vit", ["--dataset", "fashion_mnist"], "--data-dir"),  # none at the package's place
    ("vit", ["--dataset", "fashion_mnist", "--patch-size", "3"], "--patch-size"),  # 28 % 3
    # llm, through vnm-jax and alone
    ("llm", [], "command"),
    ("llm", ["quantize"], "command"),
    ("llm", ["eval", "--tokens", "9"], "--tokens"),
    ("vnm-jax", ["llm", "eval", "--gguf", "{missing}"], "--gguf"),
    ("llm", ["eval", "--gguf", "{text}"], "--gguf"),
    ("llm", ["eval", "--gguf", "{fake_gguf}"], "--gguf"),
    ("llm", ["eval", "--gguf", "{short_gguf}"], "--gguf"),
    ("llm", ["eval", "--gguf", "{dir}"], "--gguf"),
    ("llm", ["eval", "--gguf", "{gpt2_gguf}"], "--gguf"),
    ("llm", ["eval"], "--gguf"),  # no --gguf and no SmolLM2 in the cache
    ("llm", ["eval", "--eval-tokens", "0"], "--eval-tokens"),
    ("llm", ["eval", "--eval-tokens", "1e4"], "--eval-tokens"),
    ("llm", ["eval", "--gguf", "{tiny_gguf}", "--eval-tokens", "100"], "--eval-tokens"),
    ("llm", ["eval", "--gguf", "{tiny_gguf}", "--eval-tokens", "99999999"], "--eval-tokens"),
    ("llm", ["eval", "--eval-batch-size", "0"], "--eval-batch-size"),
    ("llm", ["eval", "--calibration-windows", "-1"], "--calibration-windows"),
    ("llm", ["prune", "--gguf", "{tiny_gguf}", "--eval-tokens", "512",
             "--calibration-windows", "100000"], "--calibration-windows"),
    ("llm", ["eval", "--results", "{dir}"], "--results"),
    ("llm", ["eval", "--results", "{text}/results.jsonl"], "--results"),
    ("llm", ["eval", "--permutation-seconds", "0"], "--permutation-seconds"),
    ("vnm-jax", ["llm", "prune", "--patterns", "64:3:9"], "--patterns"),
    ("llm", ["prune", "--patterns", "2:4", "64:2"], "--patterns"),
    ("llm", ["prune", "--scores", "l2"], "--scores"),
    ("llm", ["prune", "--permute", "maybe"], "--permute"),
    ("llm", ["lora", "--pattern", "2:3"], "--pattern"),
    ("llm", ["lora", "--steps", "0"], "--steps"),
    ("llm", ["lora", "--batch-size", "0"], "--batch-size"),
    ("llm", ["lora", "--sequence-length", "1"], "--sequence-length"),
    ("llm", ["lora", "--rank", "0"], "--rank"),
    ("llm", ["lora", "--learning-rate", "0"], "--learning-rate"),
    ("llm", ["lora", "--update-every", "0"], "--update-every"),
    ("llm", ["lora", "--mask-score", "hessian"], "--mask-score"),
    ("llm", ["lora", "--dtype", "float16"], "--dtype"),
    ("llm", ["study", "--preset", "tpu"], "--preset"),
    ("llm", ["study", "--parts", "grid", "speed"], "--parts"),
    ("llm", ["study", "--dtype", "int8"], "--dtype"),
    ("llm", ["study", "--deadline-seconds", "0"], "--deadline-seconds"),
    ("llm", ["study", "--lora-steps", "1"], "--lora-steps"),
    ("llm", ["study", "--lora-patterns", "64:2:5", "everything"], "--lora-patterns"),
    ("llm", ["study", "--tokens", "{missing}"], "--tokens"),
    ("llm", ["study", "--gguf", "{tiny_gguf}", "--tokens", "{text}"], "--tokens"),
    ("llm", ["study", "--save-tokens", "{exists}"], "--save-tokens"),
    ("llm", ["study", "--work-dir", "{text}"], "--work-dir"),
    ("llm", ["study", "--out-dir", "{text}"], "--out-dir"),
    ("llm", ["study", "--results", "{dir}"], "--results"),
    ("llm", ["lora", "--seed", "-2"], "--seed"),
    ("llm", ["lora", "--check-tokens", "0"], "--check-tokens"),
    ("llm", ["lora", "--new-tokens", "0"], "--new-tokens"),
    ("llm", ["lora", "--prompt", "  "], "--prompt"),
    ("llm", ["lora", "--export", "{exists}"], "--export"),
    ("llm", ["lora", "--export", "merged.txt"], "--export"),
    ("llm", ["report", "--results", "{missing}"], "--results"),
    ("llm", ["report", "--results", "{bad_jsonl}"], "--results"),
    ("llm", ["report", "--results", "{partial_jsonl}"], "--results"),
    # the repository's benchmark scripts
    ("bench/masks", ["--shape", "0", "64"], "--shape"),
    ("bench/masks", ["--shape", "64"], "--shape"),
    ("bench/masks", ["--config", "64:2:3"], "--config"),
    ("bench/masks", ["--rules", "greedy"], "--rules"),
    ("bench/masks", ["--repeats", "0"], "--repeats"),
    ("bench/permutation", ["--configs", "64:2:8,64:3:8"], "--configs"),
    ("bench/permutation", ["--methods", "paper,annealing"], "--methods"),
    ("bench/permutation", ["--time-budget-s", "0"], "--time-budget-s"),
    ("bench/permutation", ["--tolerance", "-1"], "--tolerance"),
    ("bench/permutation", ["--large-budgets", "none,-5"], "--large-budgets"),
    ("bench/permutation", ["--gguf", "{text}"], "--gguf"),
    ("bench/permutation", ["--json", "{dir}"], "--json"),
    ("bench/permutation", [], "--gguf"),  # no --gguf and no SmolLM2 in the cache
    ("bench/training", ["--config", "64:2"], "--config"),
    ("bench/training", ["--rank", "0"], "--rank"),
    ("bench/training", ["--rounds", "0"], "--rounds"),
    ("bench/training", ["--steps-per-round", "-1"], "--steps-per-round"),
    ("bench/training", ["--modes", "sparse"], "--modes"),
    ("bench/training", ["--size", "huge"], "--size"),
    ("bench/training", ["--dtype", "int8"], "--dtype"),
]


def _prog(entry, argv):
  """The program name the message must start with (a subcommand's included)."""
  main, prog = ENTRY_POINTS[entry]
  if entry == "vnm-jax" and argv and argv[0] in ("demo", "prune", "select", "bench", "vit",
                                                  "llm"):
    prog = f"vnm-jax {argv[0]}"
    argv = argv[1:]
  if prog.endswith(("llm", "vnm_recipes.llm")) and argv and argv[0] in ("eval", "prune",
                                                                        "lora", "report",
                                                                        "study"):
    prog = f"{prog} {argv[0]}"
  return prog


def _fill(arg, files):
  for placeholder, path in files.items():
    arg = arg.replace(placeholder, str(path))
  return arg


@pytest.mark.parametrize("entry, argv, named", CASES,
                         ids=[f"{e} {' '.join(a)}" for e, a, _ in CASES])
def test_bad_argument_exits_2_with_one_line_naming_it(entry, argv, named, files, capsys):
  argv_filled = [_fill(a, files) for a in argv]
  main, _ = ENTRY_POINTS[entry]
  start = time.perf_counter()
  with pytest.raises(SystemExit) as raised:
    main(argv_filled)
  seconds = time.perf_counter() - start
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert raised.value.code == 2, captured.err
  assert len(lines) == 1, captured.err
  assert lines[0].startswith(f"{_prog(entry, argv)}: error: "), lines[0]
  assert named in lines[0], lines[0]
  assert "Traceback" not in captured.err + captured.out
  assert seconds < SECONDS_PER_CASE, f"{seconds:.1f} s"


def test_messages_name_the_value_and_what_is_allowed(files, capsys):
  for argv, expected in [
      (SEL[:3] + ["--target", "-1"], ["'-1'", "> 0"]),
      (["llm", "eval", "--gguf", str(files["{text}"])],
       [str(files["{text}"]), "not a GGUF file", "b'not '", "b'GGUF'"]),
      (["prune", str(files["{ckpt}"]), "--config", "64:2:8", "--out", str(files["{ckpt}"])],
       ["already holds checkpoint steps [0]"]),
      (["vit", "--num-heads", "3"], ["num_heads (3)", "must divide dim (64)"]),
      (["llm", "eval"], ["--gguf", "not given", "python -m vnm_recipes.llm fetch"]),
      (["llm", "eval", "--gguf", str(files["{gpt2_gguf}"])],
       [str(files["{gpt2_gguf}"]), "general.architecture must be 'llama', got 'gpt2'"])]:
    with pytest.raises(SystemExit):
      cli.main(argv)
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err


def test_demo_writes_under_an_ignored_folder_by_default():
  out_dir = cli.build_parser().parse_args(["demo"]).out_dir
  assert out_dir.parts[0] == "runs"
  ignored = subprocess.run(["git", "check-ignore", "-q", str(out_dir / "results.md")],
                           cwd=ROOT, check=False)
  assert ignored.returncode == 0, "runs/ must be listed in .gitignore"


@pytest.mark.parametrize("argv, prog", [
    (["-m", "vnm_recipes.cli", "select", "--shapes", "64x64", "--target", "-1"],
     "vnm-jax select"),
    (["-m", "vnm_recipes.llm", "lora", "--steps", "0"], "python -m vnm_recipes.llm lora"),
])
def test_real_process_exits_2_without_a_traceback(argv, prog):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120, check=False)
  assert done.returncode == 2
  assert done.stderr.splitlines() == [done.stderr.strip()]
  assert done.stderr.startswith(f"{prog}: error: argument ")
  assert "Traceback" not in done.stderr and not done.stdout


def test_report_reads_a_results_file_it_wrote(tmp_path, capsys):
  results = tmp_path / "results.jsonl"
  results.write_text(json.dumps({"recipe": "dense", "eval_tokens": 512, "ppl": 9.0,
                                 "nll": 2.2}) + "\n")
  assert llm_cli.main(["report", "--results", str(results)]) == 0
  assert "| dense |" in capsys.readouterr().out
