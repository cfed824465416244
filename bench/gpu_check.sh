#!/usr/bin/env bash
# One prepared check for a lent GPU (an H200 with jax 0.11.2; installs nothing, needs no
# network), about 8 minutes in all and at most 590 s (the step timeouts add up to that):
#   env      GPU, driver, jax versions
#   tests    the Pallas decode and prefill kernel tests compiled for the GPU (not interpret),
#            and the op's tests on the GPU (vnm_matmul dispatch, gradients)
#   kernels  bench/gpu_kernels.py: block tuning, Llama-7B shapes, crossover table (bf16)
#   op       bench/kernel.py: vnm_matmul (the dispatcher's path) vs dense, bf16
#   generation  bench/generation.py: end-to-end greedy generation, GPU stack
# Results under $OUT (default bench/results/gpu), at most 8 files: gpu_check.log (all
# output), gpu_kernels.{json,md}, crossover_bfloat16.json, kernel_bfloat16.{json,md},
# generation.{json,md}.
#
#   bash bench/gpu_check.sh                         # everything
#   STEPS="tests kernels" bash bench/gpu_check.sh   # some steps
#   KERNELS_ARGS="--sections sweep crossover" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
STEPS=${STEPS:-"env tests kernels op generation"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Triton's deprecation warning on every pallas_call would fill the log.
export PYTHONWARNINGS="ignore::DeprecationWarning"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s)"; }

for s in $STEPS; do
  case "$s" in
    env)
      step "env"
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv
      timeout 30 "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, jax.devices())" ;;
    tests)
      step "kernel tests compiled for the GPU (TestDecode, TestPrefill; not interpret)"
      timeout ${TESTS_TIMEOUT:-100} "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -x \
        tests/test_pallas_decode.py tests/test_pallas_prefill.py \
        -k "not Interpret and not CudaLowering"
      step "op tests on the GPU (vnm_matmul dispatch and gradients)"
      timeout ${OP_TESTS_TIMEOUT:-60} "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
        ${OP_TESTS:-tests/test_matmul.py} ;;
    kernels)
      step "decode and prefill kernels vs cuBLAS, bf16 (bench/gpu_kernels.py)"
      timeout ${KERNELS_TIMEOUT:-190} "$PY" bench/gpu_kernels.py --out-dir "$OUT" \
        --max-seconds ${KERNELS_SECONDS:-150} ${KERNELS_ARGS:-} ;;
    op)
      step "vnm_matmul vs dense, Llama-7B shapes, bf16 (bench/kernel.py)"
      timeout ${OP_TIMEOUT:-90} "$PY" bench/kernel.py --dtype bfloat16 \
        --shapes 4096x4096 4096x11008 11008x4096 --tokens 1 16 4096 \
        --configs 2:4 64:2:5 64:2:8 128:2:8 --repeats 10 --out-dir "$OUT" ${OP_ARGS:-} ;;
    generation)
      step "end-to-end generation (bench/generation.py)"
      # Llama-7B-shaped stack, bf16, 8 layers: prefill 2048 tokens, decode at batch 1
      # and 16; its budget stops adding configs and rounds in time, and it writes its
      # results after every round, so a timeout keeps what was measured.
      timeout ${GENERATION_TIMEOUT:-120} "$PY" bench/generation.py --device gpu \
        --budget-seconds ${GENERATION_SECONDS:-100} --out-dir "$OUT" ${GENERATION_ARGS:-} ;;
    *) echo "unknown step $s" ;;
  esac
done
step "done"
ls -la "$OUT"
