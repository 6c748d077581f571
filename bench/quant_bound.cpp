// A ceiling on quantized_linear's speed-up over a float32 GEMM once both are compute bound (many
// rows, weights in cache), from two measured rates on every core at once: float32 FMAs
// (multiply-adds a second, what F.linear's GEMM runs on at best) and int8 dot products
// (vpdpbusd on AVX-512 VNNI, 4 multiply-adds a 32-bit lane; pmaddubsw + pmaddwd on AVX2, the
// AVX2 tile's pair), independent chains in registers. quantized_linear's tile spends one dot
// product instruction per 4 x 16 (or 4 x 8) multiply-adds and adds per block of 32 and row:
// two fp32 FMAs, a multiply and a conversion (the fixed summation order), and the code unpacking.
// Their ratio, dot-product rate over FMA rate, is what the integer tile can gain at most; the
// epilogue lowers it further. A target above it needs fewer instructions a multiply-add, not a
// better schedule.
//
// x86-64 with GCC, from the repository root:
//   g++ -O3 -fopenmp bench/quant_bound.cpp -o /tmp/quant_bound && /tmp/quant_bound
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>

namespace {

constexpr int kChains = 12;  // independent accumulators: more than latency x ports
constexpr long kIters = 40'000'000;
volatile int seed = 3;        // opaque: the compiler may not fold the loops

// fp32 FMA chains in GCC vector types (as attention_bound.cpp's fma_loop), instantiated per ISA.
template <typename V>
__attribute__((always_inline)) inline double fma_loop() {
  constexpr int W = sizeof(V) / sizeof(float);
  V acc[kChains], b, c;
  for (int l = 0; l < W; ++l) b[l] = 0.9999f, c[l] = 1e-6f * seed;
  for (int i = 0; i < kChains; ++i)
    for (int l = 0; l < W; ++l) acc[i][l] = 1e-3f * (seed + i);
  for (long n = 0; n < kIters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
  float s = 0;
  for (int i = 0; i < kChains; ++i) s += acc[i][0];
  return s;
}

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
__attribute__((target("arch=x86-64-v4"))) double fma512() { return fma_loop<v16f>(); }
__attribute__((target("arch=x86-64-v3"))) double fma256() { return fma_loop<v8f>(); }

__attribute__((target("avx512f,avx512bw,avx512vnni"))) double vnni512() {
  __m512i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(seed + i);
  const __m512i w = _mm512_set1_epi8(static_cast<char>(7 + seed)), x = _mm512_set1_epi8(static_cast<char>(seed));
  for (long n = 0; n < kIters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w, x);
  long s = 0;
  for (int i = 0; i < kChains; ++i) s += _mm512_reduce_add_epi32(acc[i]);
  return static_cast<double>(s);
}

// The VNNI tile's instruction mix per block of 32 inputs and row: 8 vpdpbusd (16 outputs x 32
// inputs) and the epilogue's 4 fp32 operations (a conversion, a multiply, two FMAs), as 8 dot
// product chains and 4 FMA chains; the multiply-adds counted are the dot products' alone.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) double tile_mix512() {
  __m512i acc[8];
  __m512 f[4];
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_epi32(seed + i);
  for (int i = 0; i < 4; ++i) f[i] = _mm512_set1_ps(1e-3f * (seed + i));
  const __m512i w = _mm512_set1_epi8(static_cast<char>(7 + seed)), x = _mm512_set1_epi8(static_cast<char>(seed));
  const __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-6f * seed);
  for (long n = 0; n < kIters * kChains / 8; ++n) {
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w, x);
    for (int i = 0; i < 4; ++i) f[i] = _mm512_fmadd_ps(f[i], b, c);
  }
  long s = 0;
  for (int i = 0; i < 8; ++i) s += _mm512_reduce_add_epi32(acc[i]);
  for (int i = 0; i < 4; ++i) s += static_cast<long>(_mm512_reduce_add_ps(f[i]));
  return static_cast<double>(s);
}

// AVX2's int8 dot product as the AVX2 tile runs it: maddubs (32 products into 16 pair sums),
// madd by ones (into 8 lane sums), add.
__attribute__((target("avx2"))) double maddubs256() {
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(seed + i);
  const __m256i w = _mm256_set1_epi8(static_cast<char>(7 + seed)), x = _mm256_set1_epi8(static_cast<char>(seed));
  const __m256i ones = _mm256_set1_epi16(1);
  for (long n = 0; n < kIters; ++n)
    for (int i = 0; i < kChains; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
  alignas(32) int out[8];
  long s = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), acc[i]);
    s += out[0];
  }
  return static_cast<double>(s);
}

// Multiply-adds a second (in G) of all threads together, each running `loop` at the same time;
// `macs` per instruction chain step.
double rate(double (*loop)(), double macs) {
  double seconds = 0, sink = 0;
#pragma omp parallel reduction(max : seconds) reduction(+ : sink)
  {
    const auto t0 = std::chrono::steady_clock::now();
    sink += loop();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (sink == 1.2345) std::printf(" ");  // keeps the loops
  return omp_get_max_threads() * macs * kChains * kIters / seconds / 1e9;
}

}  // namespace

int main() {
  const int threads = omp_get_max_threads();
  const bool avx512 = __builtin_cpu_supports("avx512f"), vnni = __builtin_cpu_supports("avx512vnni");
  const double f256 = rate(fma256, 8), i256 = rate(maddubs256, 32);
  std::printf("%d threads\nAVX2:    fp32 FMA %7.1f GMAC/s, int8 maddubs+madd %7.1f GMAC/s: ratio %.2f\n", threads,
              f256, i256, i256 / f256);
  if (avx512) {
    const double f512 = rate(fma512, 16);
    std::printf("AVX-512: fp32 FMA %7.1f GMAC/s", f512);
    if (vnni) {
      const double i512 = rate(vnni512, 64);
      const double mix = rate(tile_mix512, 64);
      std::printf(", int8 vpdpbusd %7.1f GMAC/s: ratio %.2f\n         the tile's mix (8 vpdpbusd + 4 fp32 ops) %7.1f"
                  " GMAC/s: ratio %.2f", i512, i512 / f512, mix, mix / f512);
    }
    std::printf("\n");
  }
  return 0;
}
