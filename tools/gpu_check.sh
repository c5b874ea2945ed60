#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: the GPU tests, then the GPU benchmark.
#
# Usage: tools/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu-check-out)
#
# Runs from a plain checkout with no install step (the repository root goes on PYTHONPATH), on
# a machine whose python3 already has numpy, numba, ml_dtypes, CuPy, pytest and hypothesis
# (PyTorch too for its peer and the CUDA-tensor tests). Writes into OUT_DIR:
#   machine.txt   GPU, driver and package versions
#   tests.log     pytest -m gpu (the CUDA parity suite, CPU-vs-GPU agreement, 64-bit
#                 indexing, streams, and the CUDA-tensor distributed tests)
#   bench.log     the benchmark's progress
#   gpu.md        the benchmark table (copy it to benchmarks/results/gpu.md)
#   linear.log, linear-gpu.md   the fused linear + cross-entropy against cuBLAS and PyTorch
#                 (copy the table to benchmarks/results/linear-gpu.md)
#   linear-vs-torch.md   linear + cross-entropy forward+backward time and peak memory against
#                 PyTorch eager at N 512 and 8192, H 4096, V 128256, bfloat16 and float32
#   interop.log   tools/gpu_interop_stress.py: cross_entropy and linear_cross_entropy on
#                 tensors a side stream is still producing, float32 and bfloat16, against
#                 torch.nn.functional, in CuPy's legacy and per-thread default stream modes
#   nccl.log      tools/gpu_nccl_check.py: a one-rank NCCL group, the distributed linear path's
#                 d_hidden reduced on the device, the vocabulary-parallel loss on CUDA tensors
# Each stage has its own time limit (TEST_SECONDS, BENCH_SECONDS, ...) so one slow stage cannot
# take the others' time; the defaults add up to 570 s, inside one 10-minute command on a lent
# machine. Exit status: 0 when every stage passed, else the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-gpu-check-out}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A GPU test that would skip fails instead: here a skip means a broken install.
export FASTXENT_REQUIRE_GPU=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv || true
    "$python" - <<'EOF'
import importlib
for name in ("numpy", "numba", "ml_dtypes", "cupy", "torch", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report and go on: the stages below say what they lack
        print(name, "unavailable:", error)
EOF
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

status=0
echo "== GPU tests (limit ${TEST_SECONDS:-240} s)"
timeout "${TEST_SECONDS:-240}" "$python" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py tests/test_gpu_linear.py tests/test_gpu_token_stats.py tests/test_linear_adapters.py tests/test_adapter_torch.py tests/test_adapter_torch_stats.py \
    tests/test_distributed.py tests/test_docs.py tests/test_torch_compile.py >"$out/tests.log" 2>&1
test_status=$?
tail -n 25 "$out/tests.log"
[ "$test_status" -ne 0 ] && status=$test_status

echo "== GPU benchmark (limit ${BENCH_SECONDS:-90} s)"
timeout "${BENCH_SECONDS:-90}" "$python" benchmarks/bench_gpu.py --out "$out/gpu.md" >"$out/bench.log" 2>&1
bench_status=$?
tail -n 40 "$out/bench.log"
[ -f "$out/gpu.md" ] && cat "$out/gpu.md"
[ "$status" -eq 0 ] && [ "$bench_status" -ne 0 ] && status=$bench_status

echo "== GPU linear + cross-entropy benchmark (limit ${LINEAR_SECONDS:-60} s)"
timeout "${LINEAR_SECONDS:-60}" "$python" -m fastxent bench --op linear --device gpu --repeats 5 \
    --shapes 2048x512x128256,8192x4096x128256 --output "$out" >"$out/linear.log" 2>&1
linear_status=$?
tail -n 30 "$out/linear.log"
[ "$status" -eq 0 ] && [ "$linear_status" -ne 0 ] && status=$linear_status

echo "== GPU linear + cross-entropy against PyTorch, N 512 and 8192, bf16 and f32 (limit ${VS_TORCH_SECONDS:-90} s)"
timeout "${VS_TORCH_SECONDS:-90}" "$python" benchmarks/bench_linear_gpu.py --repeats 3 \
    --out "$out/linear-vs-torch.md" >"$out/linear-vs-torch.log" 2>&1
vs_torch_status=$?
tail -n 20 "$out/linear-vs-torch.log"
[ "$status" -eq 0 ] && [ "$vs_torch_status" -ne 0 ] && status=$vs_torch_status

echo "== PyTorch CUDA interop under stress: a side stream, no manual sync, both CuPy stream modes (limit ${INTEROP_SECONDS:-50} s)"
timeout "${INTEROP_SECONDS:-50}" "$python" tools/gpu_interop_stress.py >"$out/interop.log" 2>&1
interop_status=$?
cat "$out/interop.log"
[ "$status" -eq 0 ] && [ "$interop_status" -ne 0 ] && status=$interop_status

echo "== Single-rank NCCL: distributed linear d_hidden reduced on the device, vocab-parallel loss (limit ${NCCL_SECONDS:-40} s)"
timeout "${NCCL_SECONDS:-40}" "$python" tools/gpu_nccl_check.py >"$out/nccl.log" 2>&1
nccl_status=$?
cat "$out/nccl.log"
[ "$status" -eq 0 ] && [ "$nccl_status" -ne 0 ] && status=$nccl_status

echo "== tests exit $test_status, benchmark exit $bench_status, linear benchmark exit $linear_status, vs PyTorch exit $vs_torch_status, interop exit $interop_status, NCCL exit $nccl_status"
exit "$status"
