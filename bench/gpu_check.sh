#!/usr/bin/env bash
# The device check, run in one go on a lent GPU machine (the device tool's `run`): build against
# that machine's torch with CUDA, run the CUDA tests (tests/ops/*cuda*) and then the benchmark
# suite on the GPU; logs and results go to $OUT.
# Usage there: OUT=... bash bench/gpu_check.sh [--quick] (needs the CUTLASS headers there: the
# nvidia-cutlass wheel installed, or CUTLASS_PATH pointing at a copy, e.g. under shared/; and
# pytest-benchmark: pip install "leanformer[bench]")
# Results: $OUT/<family>-cuda-<gpu>.json and .png per family (copy them to bench/results/ and
# run `python -m bench.report` to commit them), $OUT/bench_*.json (pytest-benchmark's JSON).
set -uo pipefail
OUT=${OUT:-bench/results}
QUICK=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LEANFORMER_CUDA=1 LEANFORMER_CUDA_ARCHS=${LEANFORMER_CUDA_ARCHS:-9.0a}
export MAX_JOBS=${MAX_JOBS:-8}
start=$(date +%s)
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
leanformer info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/info.txt"
python -c "import pytest_benchmark" 2>/dev/null || echo "pytest-benchmark is missing: the benchmarks below need it (pip install pytest-benchmark, from a wheel if offline)"
# The CUDA tests first (the N:M sparse CUTLASS GEMMs, GEMV and backward; the tree ops), so their
# result is in even if the benchmarks below do not finish.
python -m pytest tests/ops/*cuda*.py -q -rs 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
# The families with GPU-only cases first (the CUTLASS 2:4 GEMM and GEMV, GPU-sized tree attention,
# tree verification), then the others; each family's result file is written when its run ends.
leanformer bench --device cuda --suite nm_sparse_linear tree_attention tree_verify --out "$OUT" $QUICK \
  --benchmark-json "$OUT/bench_gpu_families.json" 2>&1 | tee "$OUT/bench_gpu_families.txt" | tail -60
leanformer bench --device cuda --suite linear_attention rep_batchnorm topk_mlp dense_sparse_linear \
  packed_linear tree_state models generate --out "$OUT" $QUICK --benchmark-json "$OUT/bench_others.json" \
  2>&1 | tee "$OUT/bench_others.txt" | tail -80
