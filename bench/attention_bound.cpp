// A floor under one tree-attention step's time on this CPU, from two measured rates: the FMA peak
// (independent FMAs in registers, on every core at once) and the kernels' own vector exp on an
// L1-resident buffer. The GEMMs' FLOPs at the peak, plus the exps: about half of an exp's
// vector ops are multiplies and FMAs on the same ports, the rest could hide in the add/logic
// ports under a perfect schedule, so the floor lies between GEMMs + exps / 2 and GEMMs + exps.
// No kernel goes below it without fewer FLOPs or a cheaper exp: it tells whether a speed-up
// target over SDPA is within reach on this host.
//
// x86-64 with GCC (the kernels' target attributes), from the repository root:
//   g++ -O3 -fopenmp -Icsrc bench/attention_bound.cpp -o /tmp/attention_bound
//   /tmp/attention_bound [prefix=2048 tree=64 query_heads=8 head_dim=64]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "vector_exp.h"

using namespace leanformer;

namespace {

constexpr int kChains = 12;  // independent accumulators: more than FMA latency x ports
constexpr long kIters = 50'000'000;

template <typename V>
__attribute__((always_inline)) inline double fma_loop() {
  static volatile float seed = 0.9999f;  // opaque: the compiler may not fold the loop
  const float s = seed;
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = vsplat<V>(1e-3f * s * i);
  const V b = vsplat<V>(s), c = vsplat<V>(1e-6f * s);
  for (long n = 0; n < kIters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
  float sink = 0;
  for (int i = 0; i < kChains; ++i) sink += acc[i][0];
  return sink;  // keeps the loop
}

__attribute__((target("arch=x86-64-v4"))) double fma_avx512() { return fma_loop<v16f>(); }
__attribute__((target("arch=x86-64-v3"))) double fma_avx2() { return fma_loop<v8f>(); }

// GFLOP/s of all threads together (each runs the loop at the same time).
double fma_peak(bool avx512) {
  const int width = avx512 ? 16 : 8;
  double seconds = 0;
#pragma omp parallel reduction(max : seconds)
  {
    const auto t0 = std::chrono::steady_clock::now();
    volatile double sink = avx512 ? fma_avx512() : fma_avx2();
    (void)sink;
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return omp_get_max_threads() * 2.0 * width * kChains * kIters / seconds / 1e9;
}

// Nanoseconds per exp on one core with the kernels' own vexp (vexp512 on AVX-512): the softmax's
// irreducible part (its loads, stores and maxima come on top).
__attribute__((target("arch=x86-64-v3"))) void exp_pass_avx2(float* x, size_t n) {
  for (size_t i = 0; i < n; i += 8) vstore(x + i, vexp(vload<v8f>(x + i)) - vsplat<v8f>(1.0f));  // stays in (-1, 0]
}

__attribute__((target("arch=x86-64-v4"))) void exp_pass_avx512(float* x, size_t n) {
  for (size_t i = 0; i < n; i += 16)
    _mm512_storeu_ps(x + i, _mm512_sub_ps(vexp512(_mm512_loadu_ps(x + i)), _mm512_set1_ps(1.0f)));
}

double exp_ns(bool avx512) {
  std::vector<float> x(2048);
  for (size_t i = 0; i < x.size(); ++i) x[i] = -0.01f * static_cast<float>(i % 997);
  const int reps = 20000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) (avx512 ? exp_pass_avx512 : exp_pass_avx2)(x.data(), x.size());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s", x[7] > 1.0f ? " " : "");  // keeps the stores
  return s / (static_cast<double>(reps) * x.size()) * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  const long prefix = argc > 1 ? std::atol(argv[1]) : 2048, tree = argc > 2 ? std::atol(argv[2]) : 64;
  const long heads = argc > 3 ? std::atol(argv[3]) : 8, head_dim = argc > 4 ? std::atol(argv[4]) : 64;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const int threads = omp_get_max_threads();
  const double peak = fma_peak(avx512), ns = exp_ns(avx512);
  const double keys = prefix + tree, scores = heads * tree * keys;
  const double flops = 2.0 * 2.0 * scores * head_dim;  // Q K^T and P V
  const double gemm_ms = flops / peak / 1e6, exp_ms = scores * ns / threads / 1e6;
  std::printf("%s, %d threads: FMA peak %.1f GFLOP/s, exp %.3f ns per score per core\n",
              avx512 ? "AVX-512" : "AVX2", threads, peak, ns);
  std::printf("prefix %ld, tree %ld, %ld heads x %ld: %.1f MFLOP = %.3f ms at the peak; %.0fK exps %.3f ms on %d"
              " cores; floor %.3f-%.3f ms\n", prefix, tree, heads, head_dim, flops / 1e6, gemm_ms, scores / 1e3,
              exp_ms, threads, gemm_ms + exp_ms / 2, gemm_ms + exp_ms);
  return 0;
}
