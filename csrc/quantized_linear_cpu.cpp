// quantized_linear on the CPU: y = x @ W^T + bias with W in 4- or 8-bit blocks of 32 (the
// packed layout of python/leanformer/reference/quantized_linear.py). Decoding reads every weight
// once per token, so a GEMV's time is the weight's bytes over the memory bandwidth: 4-bit codes
// with a float16 scale and minimum per 32 are 5 bits a weight against float32's 32.
//
// As llama.cpp does, each row of x is first rounded to int8 per block of 32 (scale max|x| / 127),
// so the products are integer dot products: AVX-512 VNNI's vpdpbusd multiplies 64 unsigned codes
// by 64 int8 inputs and adds them in fours, 16 outputs x 4 inputs per instruction in the tile
// layout (the 4 inputs broadcast from one 32-bit load of x). Per block and output one fp32 fma
// scales the integer sum, one more adds the minimum's term, in the order the reference fixes,
// so every path (VNNI, AVX2, portable) returns the same bits, and a row's result does not depend
// on the other rows: verification of a token tree agrees with plain decoding exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LEANFORMER_QUANT_X86 1
#define LEANFORMER_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define LEANFORMER_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

#include "grain.h"
#include "quantized_linear_checks.h"
#include "small_gemm.h"
#include "split_pool.h"

#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, inside its own AVX-512 headers

namespace leanformer {
namespace {

constexpr int64_t QB = kQuantBlock, QT = kQuantTile;

// x rounded per row and block: codes xq [M, K], dx = max|x| / 127 and sx = dx * sum(xq) [M, KB],
// and the code sums (the AVX2 8-bit path's correction) [M, KB].
struct QuantizedRows {
  int64_t ldx;  // K + 64: rows 4 KB apart would share L1 sets (K = 4096: 8 rows thrash an 8-way L1)
  std::vector<int8_t> xq;
  std::vector<float> dx, sx;
  std::vector<int32_t> xsum;
};

// Block b's scales from its max |x| and code sum (every path of quantize_row).
inline void store_block_scales(int64_t b, float a, int32_t sum, float* dx, float* sx, int32_t* xsum) {
  dx[b] = a / 127.f;
  xsum[b] = sum;
  sx[b] = dx[b] * static_cast<float>(sum);
}

// max(0, lanes...) as std::max folds it (the vector paths' max |x| of a block).
inline float lanes_max(const float* lanes, int n) {
  float a = 0.f;
  for (int i = 0; i < n; ++i) a = std::max(a, lanes[i]);
  return a;
}

template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* xq, float* dx, float* sx, int32_t* xsum) {
  for (int64_t b = 0; b < K / QB; ++b) {
    float v[QB];
    float a = 0.f;
    for (int i = 0; i < QB; ++i) {
      v[i] = static_cast<float>(x[b * QB + i]);
      a = std::max(a, std::fabs(v[i]));
    }
    const float inv = a > 0.f ? 127.f / a : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < QB; ++i) {
      const float q = std::min(127.f, std::max(-127.f, std::nearbyint(v[i] * inv)));  // half to even
      xq[b * QB + i] = static_cast<int8_t>(q);
      sum += static_cast<int32_t>(q);
    }
    store_block_scales(b, a, sum, dx, sx, xsum);
  }
}

// ---- portable: one output at a time, the same fp32 operations in the same order ----

void tile_portable(int bits, int64_t KB, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn,
                   const QuantizedRows& q, int64_t rows, float* out /* [rows, 16] */) {
  const int64_t nbytes = quant_tile_bytes(bits);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* xr = q.xq.data() + r * q.ldx;
    for (int j = 0; j < QT; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < KB; ++b) {
        const uint8_t* blk = qw + b * nbytes;
        const int8_t* xb = xr + b * QB;
        int32_t isum = 0;
        for (int i = 0; i < QB; ++i) {
          int u;
          if (bits == 8) {
            u = blk[(i / 4) * 64 + j * 4 + i % 4];
          } else {
            const int ii = i % 16;
            const uint8_t byte = blk[(ii / 4) * 64 + j * 4 + ii % 4];
            u = i < 16 ? (byte & 0x0F) : (byte >> 4);
          }
          isum += u * xb[i];
        }
        const float s = static_cast<float>(sc[b * QT + j]);
        const float m = mn ? static_cast<float>(mn[b * QT + j]) : s * -float(1 << (bits - 1));
        const float dxb = q.dx[r * KB + b], sxb = q.sx[r * KB + b];
        acc = std::fma(static_cast<float>(isum), s * dxb, acc);
        acc = std::fma(m, sxb, acc);
      }
      out[r * QT + j] = acc;
    }
  }
}

#ifdef LEANFORMER_QUANT_X86

// Every cache line of the block kPrefetch blocks ahead (and its scales and minima): a decoding
// step's weights stream from DRAM, and one core keeps more lines in flight this way than with the
// hardware prefetcher alone.
// (SmolLM2-135M Q4_1, one-token step: 13.9 ms with 2 of the 4 lines 4 blocks ahead, 11.2-11.8 ms
// with all of them 4 or 8 ahead, 10.1-12.9 at 16, 12.0-13.0 at 32.)
constexpr int64_t kPrefetch = 8;
__attribute__((always_inline)) inline void prefetch_block(const uint8_t* blk, const c10::Half* sc, const c10::Half* mn,
                                                          int64_t nbytes) {
  const char* p = reinterpret_cast<const char*>(blk + kPrefetch * nbytes);
  for (int64_t off = 0; off < nbytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(sc + kPrefetch * QT), _MM_HINT_T0);
  if (mn) _mm_prefetch(reinterpret_cast<const char*>(mn + kPrefetch * QT), _MM_HINT_T0);
}

// ---- AVX-512 VNNI: 16 outputs in one zmm of int32 sums, MR rows at once ----

template <int BITS, int MR>
LEANFORMER_VNNI_TARGET __attribute__((always_inline)) inline void tile_vnni(
    int64_t KB, int64_t ldx, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn, const int8_t* xq,
    const float* dx, const float* sx, float* out) {
  constexpr int64_t nbytes = QT * QB * BITS / 8;
  // One row alone has a single chain of 8 dependent vpdpbusd per block: two chains halve it.
  constexpr int CH = MR <= 2 ? 2 : 1;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* blk = qw + b * nbytes;
    prefetch_block(blk, sc + b * QT, mn ? mn + b * QT : nullptr, nbytes);
    __m512i isum[MR][CH];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < CH; ++c) isum[r][c] = _mm512_setzero_si512();
    const int8_t* xb = xq + b * QB;
    // isum[r][c] += w . (4 inputs of row r from k), c the chain (lambdas would lose the target)
#define LEANFORMER_DOT(c, w, k)                                                \
  for (int r = 0; r < MR; ++r) {                                               \
    int32_t x4;                                                                \
    std::memcpy(&x4, xb + r * ldx + (k), 4);                                     \
    isum[r][c] = _mm512_dpbusd_epi32(isum[r][c], (w), _mm512_set1_epi32(x4)); \
  }
    if constexpr (BITS == 8) {
      for (int g = 0; g < 8; ++g) {
        const __m512i w = _mm512_loadu_si512(blk + 64 * g);
        LEANFORMER_DOT(g % CH, w, 4 * g)
      }
    } else {
      for (int h = 0; h < 4; ++h) {
        const __m512i v = _mm512_loadu_si512(blk + 64 * h);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        LEANFORMER_DOT(h % CH, lo, 4 * h)
        LEANFORMER_DOT((h + 1) % CH, hi, 16 + 4 * h)
      }
    }
#undef LEANFORMER_DOT
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + b * QT)));
    const __m512 m = mn ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + b * QT)))
                        : _mm512_mul_ps(s, _mm512_set1_ps(-float(1 << (BITS - 1))));
    for (int r = 0; r < MR; ++r) {
      __m512i t = isum[r][0];
      if constexpr (CH == 2) t = _mm512_add_epi32(t, isum[r][1]);
      const __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(dx[r * KB + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sd, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * KB + b]), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * QT, acc[r]);
}

// ---- AVX2: half a tile (8 outputs) per ymm; maddubs + madd for the integer dot products ----

template <int BITS, int MR>
LEANFORMER_AVX2_TARGET __attribute__((always_inline)) inline void half_tile_avx2(
    int half, int64_t KB, int64_t ldx, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn, const int8_t* xq,
    const float* dx, const float* sx, const int32_t* xsum, float* out) {
  constexpr int64_t nbytes = QT * QB * BITS / 8;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* blk = qw + b * nbytes + half * 32;
    if (half == 0) prefetch_block(blk, sc + b * QT, mn ? mn + b * QT : nullptr, nbytes);
    __m256i isum[MR];
    for (int r = 0; r < MR; ++r) isum[r] = _mm256_setzero_si256();
    const int8_t* xb = xq + b * QB;
    // 4-bit codes (< 16) times int8: maddubs's int16 pair sums cannot saturate (2 * 15 * 127).
    // 8-bit codes: u - 128 as int8 w, |w| * sign(x, w) (at most 2 * 128 * 127 per pair), and the
    // 128 * sum(x) taken out added back below. (Macros: lambdas would lose the target.)
#define LEANFORMER_DOT(wu, ws, k)                                                      \
  for (int r = 0; r < MR; ++r) {                                                       \
    int32_t x4;                                                                        \
    std::memcpy(&x4, xb + r * ldx + (k), 4);                                             \
    const __m256i xv = _mm256_set1_epi32(x4);                                          \
    const __m256i p = _mm256_maddubs_epi16((wu), BITS == 8 ? _mm256_sign_epi8(xv, (ws)) : xv); \
    isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones16));                 \
  }
    if constexpr (BITS == 8) {
      for (int g = 0; g < 8; ++g) {
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * g)), flip);
        const __m256i aw = _mm256_abs_epi8(w);
        LEANFORMER_DOT(aw, w, 4 * g)
      }
      for (int r = 0; r < MR; ++r) isum[r] = _mm256_add_epi32(isum[r], _mm256_set1_epi32(128 * xsum[r * KB + b]));
    } else {
      for (int h = 0; h < 4; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h));
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        LEANFORMER_DOT(lo, lo, 4 * h)
        LEANFORMER_DOT(hi, hi, 16 + 4 * h)
      }
    }
#undef LEANFORMER_DOT
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b * QT + half * 8)));
    const __m256 m = mn ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + b * QT + half * 8)))
                        : _mm256_mul_ps(s, _mm256_set1_ps(-float(1 << (BITS - 1))));
    for (int r = 0; r < MR; ++r) {
      const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(dx[r * KB + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), sd, acc[r]);
      acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r * KB + b]), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + r * QT + half * 8, acc[r]);
}

// The rows of one tile, in blocks of at most MR rows, each height instantiated.
// (Two functions, not one template over a lambda: a lambda would lose the target attribute.)
template <int BITS, int MR>
LEANFORMER_VNNI_TARGET void rows_vnni(int64_t KB, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn,
                                      const QuantizedRows& q, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows;) {
    const int64_t n = std::min<int64_t>(MR, rows - r);
    const int8_t* xq = q.xq.data() + r * q.ldx;
    const float* dx = q.dx.data() + r * KB;
    const float* sx = q.sx.data() + r * KB;
    float* o = out + r * QT;
    switch (n) {
#define LEANFORMER_CASE(R) \
  case R: tile_vnni<BITS, R>(KB, q.ldx, qw, sc, mn, xq, dx, sx, o); break;
      LEANFORMER_CASE(1) LEANFORMER_CASE(2) LEANFORMER_CASE(3) LEANFORMER_CASE(4)
      LEANFORMER_CASE(5) LEANFORMER_CASE(6) LEANFORMER_CASE(7) LEANFORMER_CASE(8)
#undef LEANFORMER_CASE
    }
    r += n;
  }
}

template <int BITS, int MR>
LEANFORMER_AVX2_TARGET void rows_avx2(int64_t KB, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn,
                                      const QuantizedRows& q, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows;) {
    const int64_t n = std::min<int64_t>(MR, rows - r);
    const int8_t* xq = q.xq.data() + r * q.ldx;
    const float* dx = q.dx.data() + r * KB;
    const float* sx = q.sx.data() + r * KB;
    const int32_t* xs = q.xsum.data() + r * KB;
    float* o = out + r * QT;
    for (int half = 0; half < 2; ++half) {
      switch (n) {
#define LEANFORMER_CASE(R) \
  case R: half_tile_avx2<BITS, R>(half, KB, q.ldx, qw, sc, mn, xq, dx, sx, xs, o); break;
        LEANFORMER_CASE(1) LEANFORMER_CASE(2) LEANFORMER_CASE(3) LEANFORMER_CASE(4)
#undef LEANFORMER_CASE
      }
    }
    r += n;
  }
}

// ---- x rounded to int8, one block of 32 at a time: quantize_row's operations, vectorized ----
// max|v| (a NaN input never wins, as in std::max(a, |v|)), q = clamp(round_half_even(v * inv), -127, 127)
// with the operands ordered so that a NaN product gives -127 as the scalar code does, the codes' sum.

LEANFORMER_VNNI_TARGET void quantize_row_avx512(const float* x, int64_t K, int8_t* xq, float* dx, float* sx,
                                                int32_t* xsum) {
  const __m512 sign = _mm512_set1_ps(-0.0f), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t b = 0; b < K / QB; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * QB), v1 = _mm512_loadu_ps(x + b * QB + 16);
    const __m512 m = _mm512_max_ps(_mm512_andnot_ps(sign, v1),
                                   _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_setzero_ps()));
    float lanes[16];
    _mm512_storeu_ps(lanes, m);
    const float a = lanes_max(lanes, 16);
    const float inv = a > 0.f ? 127.f / a : 0.f;
    const __m512 s = _mm512_set1_ps(inv);
    // (no lambda: it would lose the target attribute)
    const __m512 r0 = _mm512_roundscale_ps(_mm512_mul_ps(v0, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r1 = _mm512_roundscale_ps(_mm512_mul_ps(v1, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r0, lo), hi));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r1, lo), hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * QB), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * QB + 16), _mm512_cvtepi32_epi8(q1));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    store_block_scales(b, a, sum, dx, sx, xsum);
  }
}

LEANFORMER_AVX2_TARGET void quantize_row_avx2(const float* x, int64_t K, int8_t* xq, float* dx, float* sx,
                                              int32_t* xsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (int64_t b = 0; b < K / QB; ++b) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + b * QB + 8 * j);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), m);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    const float a = lanes_max(lanes, 8);
    const float inv = a > 0.f ? 127.f / a : 0.f;
    const __m256 s = _mm256_set1_ps(inv);
    __m256i q[4], total = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
      total = _mm256_add_epi32(total, q[j]);
    }
    // int32 -> int8 in order: packs work within 128-bit lanes, the permute puts the 4 groups back
    const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b8 = _mm256_packs_epi16(w01, w23);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * QB),
                        _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    int32_t t[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), total);
    int32_t sum = 0;
    for (int i = 0; i < 8; ++i) sum += t[i];
    store_block_scales(b, a, sum, dx, sx, xsum);
  }
}

bool cpu_has_vnni() {
  static const bool yes =
      cpu_has_avx512() && __builtin_cpu_supports("avx512vnni") && !std::getenv("LEANFORMER_DISABLE_AVX2");
  return yes;
}
// LEANFORMER_DISABLE_AVX2=1 (tests) runs the portable loops on an AVX2 CPU.
bool cpu_has_avx2_f16c() {
  static const bool yes = !std::getenv("LEANFORMER_DISABLE_AVX2") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif  // LEANFORMER_QUANT_X86

// Rows of one tile -> out [rows, 16], on the best path this CPU has.
void run_tile(int bits, int64_t KB, const uint8_t* qw, const c10::Half* sc, const c10::Half* mn,
              const QuantizedRows& q, int64_t rows, float* out) {
#ifdef LEANFORMER_QUANT_X86
  if (cpu_has_vnni()) {
    if (bits == 8)
      rows_vnni<8, 8>(KB, qw, sc, mn, q, rows, out);
    else
      rows_vnni<4, 8>(KB, qw, sc, mn, q, rows, out);
    return;
  }
  if (cpu_has_avx2_f16c()) {
    if (bits == 8)
      rows_avx2<8, 4>(KB, qw, sc, mn, q, rows, out);
    else
      rows_avx2<4, 4>(KB, qw, sc, mn, q, rows, out);
    return;
  }
#endif
  tile_portable(bits, KB, qw, sc, mn, q, rows, out);
}

// quantize_row on the best path this CPU has (float32 x; every path the same bits).
template <typename T>
void quantize_row_best(const T* x, int64_t K, int8_t* xq, float* dx, float* sx, int32_t* xsum) {
#ifdef LEANFORMER_QUANT_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_vnni()) return quantize_row_avx512(x, K, xq, dx, sx, xsum);
    if (cpu_has_avx2_f16c()) return quantize_row_avx2(x, K, xq, dx, sx, xsum);
  }
#endif
  quantize_row(x, K, xq, dx, sx, xsum);
}

at::Tensor quantized_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias,
                                int64_t bits, int64_t out_features) {
  check_quantized_linear_inputs(x, qweight, scales, mins, bias, bits, out_features);
  const int64_t K = x.size(-1), KB = K / QB, N = out_features, T = qweight.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (rows == 0 || N == 0) return y.to(x.scalar_type());
  if (K == 0) {
    y.zero_();
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type());
  }
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous();
  const std::optional<at::Tensor> mc = mins.has_value() ? std::optional<at::Tensor>(mins->contiguous()) : std::nullopt;
  auto qrows = std::make_shared<QuantizedRows>();
  QuantizedRows& q = *qrows;
  q.ldx = K + 64;
  q.xq.resize(rows * q.ldx);
  q.dx.resize(rows * KB);
  q.sx.resize(rows * KB);
  q.xsum.resize(rows * KB);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    parallel_for(0, rows, parallel_grain(work_ns(0, K * xc.element_size(), K)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        quantize_row_best(xp + r * K, K, q.xq.data() + r * q.ldx, q.dx.data() + r * KB, q.sx.data() + r * KB,
                     q.xsum.data() + r * KB);
    });
  });
  const uint8_t* qw = qc.data_ptr<uint8_t>();
  const c10::Half* sp = sc.data_ptr<c10::Half>();
  const c10::Half* mp = mc.has_value() ? mc->data_ptr<c10::Half>() : nullptr;
  const float* bp = nullptr;
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const int64_t nbytes = quant_tile_bytes(bits);
  // The tiles in chunks, on the calling thread and split_run's helpers (split_pool.h).
  const int64_t tiles_per_chunk = split_units_per_chunk(T);
  // By value: a helper may still run a chunk the caller took back after this call returned.
  auto run = [qrows, keep = storages_of(qc, sc, mc.has_value() ? *mc : at::Tensor(), bf), qw, sp, mp, bp, bits, KB,
              N, T, nbytes, tiles_per_chunk, rows](
                 int64_t c, float* dst, int64_t ld, bool) {
    thread_local std::vector<float> buf;
    buf.resize(size_t(rows * QT));
    const int64_t t_end = std::min(T, (c + 1) * tiles_per_chunk);
    for (int64_t t = c * tiles_per_chunk; t < t_end; ++t) {
      run_tile(int(bits), KB, qw + t * KB * nbytes, sp + t * KB * QT, mp ? mp + t * KB * QT : nullptr, *qrows,
               rows, buf.data());
      const int64_t n0 = t * QT, cols = std::min(QT, N - n0), d0 = n0 - c * tiles_per_chunk * QT;
      for (int64_t r = 0; r < rows; ++r) {
        float* o = dst + r * ld + d0;
        const float* src = buf.data() + r * QT;
        if (bp)
          for (int64_t j = 0; j < cols; ++j) o[j] = src[j] + bp[n0 + j];
        else
          std::copy(src, src + cols, o);
      }
    }
  };
  split_run(make_split_job(rows, N, tiles_per_chunk, QT, y.data_ptr<float>(), std::move(run)));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("quantized_linear", &quantized_linear_cpu); }

}  // namespace leanformer
