#!/usr/bin/env bash
# One prepared check for a lent GPU (no network needed): the Pallas kernel tests compiled
# for the GPU (not interpret mode), then the kernel benchmarks in bfloat16.
# Results go under $OUT (default bench/results/gpu): gpu_check.log (everything printed),
# layouts_bfloat16.json (+ m5/), tune_bfloat16.json (+ decode/), kernel_bfloat16.{json,md}.
#
#   bench/gpu_check.sh          # tests + layouts + block tuning + Llama-7B sweep (~6 min)
#   STEPS=sweep SWEEP_SHAPES="768x768 768x3072 3072x768" SWEEP_TOKENS="1 16 256 2048" bench/gpu_check.sh
#   STEPS="tests sweep" bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
STEPS=${STEPS:-"tests layouts sweep tune"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

step() { echo; echo "=== $1 ($(date +%T))"; }

step env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
}

for s in $STEPS; do
  case "$s" in
    tests)
      step "kernel tests, compiled (not interpret)"
      timeout 70 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_pallas_vnm_matmul.py \
        -k "not Interpret" ;;
    layouts)
      step "packed vs condensed Pallas layouts vs XLA vs dense"
      timeout 70 "$PY" bench/kernel.py --layouts --dtype bfloat16 --shapes 4096x4096 \
        --tokens 16 256 1024 4096 --configs 64:2:8 --repeats 10 --out-dir "$OUT"
      timeout 40 "$PY" bench/kernel.py --layouts --dtype bfloat16 --shapes 4096x4096 \
        --tokens 16 --configs 64:2:5 --repeats 10 --out-dir "$OUT/m5" ;;
    tune)
      step "block sizes, 4096x4096 64:2:8, 4096 tokens and 16 tokens"
      timeout 80 "$PY" bench/kernel.py --tune --dtype bfloat16 --shapes 4096x4096 --tokens 4096 \
        --configs 64:2:8 --repeats 5 --out-dir "$OUT"
      timeout 50 "$PY" bench/kernel.py --tune --dtype bfloat16 --shapes 4096x4096 --tokens 16 \
        --configs 64:2:5 --repeats 5 --out-dir "$OUT/decode" ;;
    sweep)
      step "model shapes, bfloat16, Pallas"
      timeout ${SWEEP_TIMEOUT:-140} "$PY" bench/kernel.py --dtype bfloat16 --implementation pallas \
        --shapes ${SWEEP_SHAPES:-4096x4096 4096x11008 11008x4096} \
        --tokens ${SWEEP_TOKENS:-16 4096} --configs ${SWEEP_CONFIGS:-2:4 64:2:5 64:2:8 128:2:8} \
        --repeats 10 --out-dir "$OUT" ;;
    *) echo "unknown step $s" ;;
  esac
done
step done
