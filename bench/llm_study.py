"""Runs the LLM study (vnm_recipes.llm.study) on SmolLM2-135M and writes its table and plot.

    python bench/llm_study.py --preset cpu                 # the reduced CPU schedule (~60 min)
    python bench/llm_study.py --preset cpu --parts grid allocation   # one chunk
    python bench/llm_study.py --preset gpu --gguf X --tokens runs/gpu_llm/a/tokens.npz \\
        --work-dir W --results $OUT/results.jsonl --out-dir $OUT --deadline-s 420

Writes records to --results (JSONL, appended; records already there are skipped), the
artifacts (input norms, permutations, sensitivities, allocations) to --work-dir, and
`study.md` (table) and `perplexity_vs_density.png` to --out-dir. Every option is checked
before the model loads; a bad one exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from vnm_recipes.llm.study import PARTS, PRESETS  # noqa: E402


def _fail(message: str) -> None:
  print(f"llm_study.py: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="cpu", help=f"one of {sorted(PRESETS)}")
  parser.add_argument("--gguf", help="SmolLM2 GGUF (default: found by vnm_recipes.gguf)")
  parser.add_argument("--tokens", help="a .npz with train/eval tokens (default: tokenize the "
                                       "pydoc text)")
  parser.add_argument("--work-dir", default="runs/llm_study/work")
  parser.add_argument("--results", default="runs/llm_study/results.jsonl")
  parser.add_argument("--out-dir", default="runs/llm_study")
  parser.add_argument("--parts", nargs="+", default=list(PARTS))
  parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
  parser.add_argument("--deadline-s", type=float, default=None,
                      help="wall-clock budget; LoRA runs are shortened to fit")
  parser.add_argument("--lora-steps", type=int, default=None, help="override the preset's")
  parser.add_argument("--save-tokens", help="write the token split to this .npz and exit")
  args = parser.parse_args(argv)
  if args.preset not in PRESETS:
    _fail(f"--preset {args.preset!r}: must be one of {sorted(PRESETS)}")
  bad = [p for p in args.parts if p not in PARTS]
  if bad:
    _fail(f"--parts {bad[0]!r}: must be among {list(PARTS)}")
  if args.dtype not in ("auto", "float32", "bfloat16"):
    _fail(f"--dtype {args.dtype!r}: must be auto, float32 or bfloat16")
  if args.deadline_s is not None and not args.deadline_s > 0:
    _fail(f"--deadline-s {args.deadline_s}: must be > 0 seconds")
  if args.lora_steps is not None and args.lora_steps < 20:
    _fail(f"--lora-steps {args.lora_steps}: must be an int >= 20")
  for option in ("gguf", "tokens"):
    value = getattr(args, option)
    if value is not None and not Path(value).is_file():
      _fail(f"--{option} {value!r}: not a file")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax.numpy as jnp

  from vnm_recipes import gguf
  from vnm_recipes.data.text import split_pydoc_topics
  from vnm_recipes.llm.reports import plot_study, read_records, study_table
  from vnm_recipes.llm.study import load_split, run_study, save_split

  start = time.perf_counter()
  path = Path(args.gguf) if args.gguf else gguf.find_smollm2_gguf()
  model, tokenizer = gguf.load_llama(path)
  split = load_split(Path(args.tokens)) if args.tokens else split_pydoc_topics(tokenizer)
  print(f"loaded {path} and {len(split.train)} + {len(split.eval)} tokens in "
        f"{time.perf_counter() - start:.0f} s", flush=True)
  if args.save_tokens:
    save_split(split, Path(args.save_tokens))
    return 0
  settings = PRESETS[args.preset]
  if args.lora_steps is not None:
    settings = dataclasses.replace(settings,
                                   lora=dataclasses.replace(settings.lora, steps=args.lora_steps))
  dtype = None if args.dtype == "auto" else jnp.dtype(args.dtype)
  results = Path(args.results)
  deadline = None if args.deadline_s is None else args.deadline_s - (time.perf_counter() - start)
  run_study(settings, model, split, work_dir=Path(args.work_dir), results=results,
            parts=args.parts, dtype=dtype, deadline_s=deadline,
            log=lambda line: print(line, flush=True))
  records = read_records(results)
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "study.md").write_text(study_table(records) + "\n")
  plot_study(records, out / "perplexity_vs_density.png",
             title=f"SmolLM2-135M, preset {args.preset}, {records[-1]['eval_tokens']} "
                   f"held-out tokens, {records[-1]['dtype']} on {records[-1]['backend']}")
  print(study_table(records), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
