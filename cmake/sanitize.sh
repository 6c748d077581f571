#!/usr/bin/env bash
# Builds leanformer._C under a sanitizer (cmake/CMakeLists.txt) and runs tests with it.
#
#   cmake/sanitize.sh                          ASan + UBSan; the op tests and the fuzz suite
#   cmake/sanitize.sh address tests/ops/test_topk_mlp.py -k strided     any pytest arguments
#   cmake/sanitize.sh thread                   TSan, on its subset (see TSAN_TESTS)
#
# Fails (non-zero) on any sanitizer report, in the pytest process or a subprocess it starts: the
# runtimes abort at the first report and write it to <build>/reports/, which is printed here.
# Nothing in the source tree changes: the package runs from <build>/python/leanformer.
# Variables: LEANFORMER_SANITIZE_BUILD (build dir, default build/sanitize-<mode>), PYTHON (python),
# CMAKE_BUILD_PARALLEL_LEVEL (compile jobs, default: cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The tests the sanitizer job runs (CI: `cmake/sanitize.sh` with no arguments): the op tests and
# the fuzz suite. One place; a path that does not exist (yet) is reported and left out.
SANITIZE_TESTS="tests/ops tests/fuzz"
# TSan: one test file per family on a few cases, where the kernels run at::parallel_for.
TSAN_TESTS="tests/ops/test_linear_attention.py tests/ops/test_nm_sparse_linear.py tests/ops/test_topk_mlp.py
  tests/ops/test_tree_attention.py tests/ops/test_rep_batchnorm.py tests/ops/test_packed_linear.py"

mode=address
if [[ $# -gt 0 && ( $1 == address || $1 == thread ) ]]; then mode=$1; shift; fi
build=${LEANFORMER_SANITIZE_BUILD:-build/sanitize-$mode}
if [[ $build != /* ]]; then build=$root/$build; fi
python=${PYTHON:-python}

t0=$(date +%s)
generator=()
if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja >/dev/null; then generator=(-G Ninja); fi
mkdir -p "$build"
cmake -S cmake -B "$build" "${generator[@]}" -DLEANFORMER_SANITIZE="$mode" \
      -DPython_EXECUTABLE="$("$python" -c 'import sys; print(sys.executable)')" >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
t1=$(date +%s)
echo "sanitize.sh: $mode build took $((t1 - t0)) s"

# shellcheck source=/dev/null
source "$build/sanitizer.env"  # SANITIZER_PRELOAD: the runtime, then libstdc++ (see below)
reports=$build/reports
rm -rf "$reports" && mkdir -p "$reports"
# halt/abort at the first report (abort: pytest's faulthandler then prints the Python stack, i.e.
# the test). ASan and TSan write every process's report to $reports/<tool>.<pid>, also where a test
# only looks at a subprocess's exit status. UBSan cannot: GCC's libubsan beside libasan ignores
# log_path and writes to stderr, so pytest runs with --capture=sys (stderr is not captured) and its
# output, saved to <build>/pytest.log, is searched for reports too.
common="halt_on_error=1:abort_on_error=1"
# detect_leaks=0: python and torch keep interned objects, caches and arenas until exit by design
# (LeakSanitizer reports thousands of them); leanformer's tensors are freed by torch's allocator.
export ASAN_OPTIONS="$common:log_path=$reports/asan:detect_leaks=0:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="$common:print_stacktrace=1:report_error_type=1"
export TSAN_OPTIONS="$common:log_path=$reports/tsan:second_deadlock_stack=1:suppressions=$root/cmake/tsan.supp"
# python itself is not instrumented, so the runtime is preloaded; with ASan also libstdc++: ASan
# intercepts __cxa_throw and looks the real one up when it starts, before python has loaded
# libstdc++, and without it every C++ exception (a TORCH_CHECK failing) aborts.
export LD_PRELOAD="$SANITIZER_PRELOAD${LD_PRELOAD:+ $LD_PRELOAD}"
export PYTHONPATH="$build/python:$root/cmake${PYTHONPATH:+:$PYTHONPATH}"
export LEANFORMER_SANITIZE_MODE=$mode

args=("$@")
if [[ ${#args[@]} -eq 0 ]]; then
  default=$SANITIZE_TESTS
  if [[ $mode == thread ]]; then default=$TSAN_TESTS; fi
  for path in $default; do
    if [[ -e $path ]]; then args+=("$path"); else echo "sanitize.sh: $path does not exist, left out"; fi
  done
fi
set +e
"$python" -m pytest -p sanitizer_plugin -q --capture=sys --durations=15 "${args[@]}" 2>&1 | tee "$build/pytest.log"
status=${PIPESTATUS[0]}
set -e
t2=$(date +%s)
echo "sanitize.sh: $mode tests took $((t2 - t1)) s"
failed=0
if compgen -G "$reports/*" >/dev/null; then
  for f in "$reports"/*; do echo "===== $f"; cat "$f"; done
  echo "sanitize.sh: FAILED: sanitizer reports above (one file per process, in $reports)"
  failed=1
fi
if grep -q -E "runtime error:|ERROR: (AddressSanitizer|LeakSanitizer)|WARNING: ThreadSanitizer" "$build/pytest.log"; then
  echo "sanitize.sh: FAILED: a sanitizer report in the test output ($build/pytest.log):"
  grep -E -A3 "runtime error:|ERROR: (AddressSanitizer|LeakSanitizer)|WARNING: ThreadSanitizer" "$build/pytest.log" | head -40
  failed=1
fi
if [[ $status -ne 0 ]]; then echo "sanitize.sh: FAILED: pytest exited with $status"; failed=1; fi
exit $failed
