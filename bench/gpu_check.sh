#!/usr/bin/env bash
# The device check, run in one go on a lent GPU machine (the device tool's `run`):
# build against that machine's torch with CUDA, run the whole test suite (CUDA cases run
# when a GPU is present), then the benchmark suite on the GPU; logs and results go to $OUT.
# Usage there: OUT=... bash bench/gpu_check.sh (needs the CUTLASS headers there: the nvidia-cutlass
# wheel installed, or CUTLASS_PATH pointing at a copy, e.g. under shared/)
set -uo pipefail
OUT=${OUT:-bench/results}
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
# The N:M sparse CUDA paths first (CUTLASS 2:4 GEMMs, GEMV, backward), so their result is in
# even if the full run below does not finish; then its GPU-only benchmark suite.
python -m pytest tests/test_nm_sparse_cuda.py -q -rs 2>&1 | tee "$OUT/tests_nm_sparse_cuda.log" | tail -15
leanformer bench --device cuda --suite nm_sparse_cuda --out "$OUT" 2>&1 | grep -v '%|' | tee "$OUT/bench_nm_sparse_cuda.txt"
python -m pytest tests -q -rs 2>&1 | tee "$OUT/tests.log" | tail -25
leanformer bench --device cuda --out "$OUT" 2>&1 | grep -v '%|' | tee "$OUT/bench.txt"
# GPU-sized tree-decoding cases (prefix 8192, head dim 128, V = 32000), not in the common suite.
python -m bench.tree_attention_cuda --out "$OUT" 2>&1 | tee "$OUT/bench_tree_cuda.txt"
