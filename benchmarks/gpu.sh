#!/usr/bin/env bash
# The GPU run in one command, on a machine with one CUDA GPU (about 8 minutes):
#
#   bash benchmarks/gpu.sh            # CUDA tests, then the benchmark; results under
#                                     # benchmarks/results/ (JSON + PNG + test log)
#   bash benchmarks/gpu.sh --check    # no GPU needed: syntax, the environment record,
#                                     # test collection, and a tiny CPU benchmark run
#
# 1. the tests that need CUDA (they skip on a CPU-only machine), log in gpu_tests.txt;
# 2. compare_eager_vs_compile.py --device cuda: ResNet-18 (CIFAR stem) and
#    mobilenet_v3_small, float32 and bf16, channels_last, every arm (compiled + donated
#    included), -> compare_cuda_full.{json,png}; LeNet the same without channels_last
#    (the zoo's LeNet module flattens with .view, which NHWC strides refuse)
#    -> compare_cuda_lenet.{json,png};
# 3. ResNet-18 bf16 channels_last with compile_mode="reduce-overhead" (CUDA graphs)
#    -> compare_cuda_reduce_overhead.{json,png}.
# Every JSON records the GPU name and the torch and CUDA versions; gpu_env.json too.
# Each step has its own time limit, so the whole run stays under ~8 minutes; a step that
# hits it is reported and the next one still runs. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=$PWD
RESULTS=benchmarks/results
CACHE=${COMPILE_CACHE:-${TMPDIR:-/tmp}/functorch_diary_compile_cache_cuda}
mkdir -p "$RESULTS"
status=0

run() {  # run LIMIT_S NAME CMD...: one step, bounded, its exit status remembered
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! $name exited with $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
        status=1
    fi
}

environment() {  # gpu_env.json: what ran where
    "$PY" - "$1" <<'PY'
import json, platform, sys
import torch
cuda = torch.cuda.is_available()
env = {
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_count": torch.cuda.device_count(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None,
    "python": platform.python_version(),
}
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
print(json.dumps(env))
PY
}

CUDA_TESTS=(tests/training/test_compile.py tests/test_errors.py
            tests/checkpoint/test_format.py tests/model/test_pretrained.py)

if [ "${1:-}" = "--check" ]; then
    tmp=$(mktemp -d)
    run 60 "environment" environment "$tmp/gpu_env.json"
    run 120 "collect the CUDA tests" "$PY" -m pytest -p no:xdist -q --collect-only \
        -k cuda "${CUDA_TESTS[@]}"
    run 300 "tiny CPU benchmark" "$PY" benchmarks/compare_eager_vs_compile.py \
        --models lenet --arms 3,5 --warmup 1 --rounds 2 --steps 1 --batch 8 \
        --out "$tmp/check.json"
    exit $status
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: torch sees no CUDA device (use --check on a CPU machine)" >&2
    exit 2
fi
environment "$RESULTS/gpu_env.json"
run 90 "CUDA tests" bash -c "'$PY' -m pytest -p no:xdist -q -rs -k cuda ${CUDA_TESTS[*]} \
    2>&1 | tee '$RESULTS/gpu_tests.txt'; exit \${PIPESTATUS[0]}"
run 240 "benchmark, float32 + bf16, channels_last" "$PY" benchmarks/compare_eager_vs_compile.py \
    --device cuda --models resnet18,mobilenet_v3_small --dtypes float32,bf16 \
    --channels-last --rounds 7 --compile-cache "$CACHE" --out "$RESULTS/compare_cuda_full.json"
run 60 "benchmark, LeNet float32 + bf16" "$PY" benchmarks/compare_eager_vs_compile.py \
    --device cuda --models lenet --dtypes float32,bf16 --rounds 7 --compile-cache "$CACHE" \
    --out "$RESULTS/compare_cuda_lenet.json"
run 90 "benchmark, ResNet-18 bf16, reduce-overhead" "$PY" benchmarks/compare_eager_vs_compile.py \
    --device cuda --models resnet18 --dtypes bf16 --channels-last --arms 2,4,6 --rounds 7 \
    --compile-mode reduce-overhead --compile-cache "$CACHE" \
    --out "$RESULTS/compare_cuda_reduce_overhead.json"
ls -l "$RESULTS"/gpu_env.json "$RESULTS"/gpu_tests.txt "$RESULTS"/compare_cuda_*
exit $status
