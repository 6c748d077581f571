// N:M sparse linear on the CPU: y = x @ S^T + bias, reading only S's values and metadata
// (the layout is in nm_sparse_linear_checks.h).
//
// Forward paths:
//  * one token (decode, the memory-bound case the format is for): a GEMV per output row, the
//    rows in chunks over split_run's threads in float32 (split_pool.h), parallel_for otherwise. 2:4 and 1:4 turn half a meta word into the in-group indices of 8
//    values with one vector shift and mask, permute x's columns into value order (vpermps
//    in the AVX2 clone) and do one 8-wide FMA per 8 values; with AVX-512 a whole meta word
//    (16 values) takes one shift, one vpternlogd and one vpermt2ps (two and a blend for 1:4)
//    per 16-wide FMA, 4 rows at a time. Other patterns take the tile kernel below with one
//    token.
//  * several tokens: x is transposed to x^T [K, Np] (tokens padded to whole tiles), so the
//    T tokens of a tile at one column are one contiguous run of NV vectors. A task is
//    (token tile, block of rows); each weight row is decoded once per tile into its columns,
//    then every value costs NV vector FMAs against x^T[col], for RB rows at a time (RB * NV
//    independent accumulators hide the FMA latency).
// Backward:
//  * grad_x = grad_y @ S: per token tile, each row's values are scattered into a private
//    [K, T] buffer (grad_x^T), so tasks never share an output; with fewer tiles than threads
//    the rows are split between tasks too and their buffers summed.
//  * grad_values[r, j] = sum_t grad_y[t, r] * x[t, col(r, j)]: parallel over rows, a dot of
//    grad_y^T[r] and x^T[col] over the tokens.
// Sums accumulate in fp32 (fp64 for fp64).
// Non-finite inputs: every path gives the dense reference's IEEE result (x @ S_dense^T, where a
// pruned entry is a stored 0 and 0 * inf = NaN). The sparse kernels skip pruned columns, so a
// cheap scan flags the tokens of x (of grad_y in the backward) holding a non-finite value, and
// only those tokens' outputs are fixed up afterwards: NaN wherever the dense product would have
// multiplied a non-finite value by a pruned zero. Finite inputs cost the scan alone.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_vec.h"
#include "grain.h"
#include "nm_sparse_linear_checks.h"
#include "small_gemm.h"
#include "split_pool.h"

namespace leanformer {
namespace {

typedef int32_t v8i __attribute__((vector_size(32)));

// The packed layout of one call, and (j / n) * m, the first column of value j's group: the
// same for every row, so decoding a row is a shift, a mask and an add per value.
struct NMLayout {
  int64_t n, m, K, V, W;
  int bits;
  std::vector<int32_t> group_base;
};

NMLayout make_layout(int64_t n, int64_t m, int64_t K) {
  NMLayout L{n, m, K, K / m * n, 0, nm_meta_bits(m), {}};
  L.W = nm_meta_words(L.V, m);
  L.group_base.resize(L.V);
  for (int64_t j = 0; j < L.V; ++j) L.group_base[j] = static_cast<int32_t>(j / n * m);
  TORCH_CHECK(K < (int64_t(1) << 31), "x.shape[-1] (K = ", K, ") must be below 2^31");
  return L;
}

template <int BITS>
__attribute__((always_inline)) inline void decode_bits(const int32_t* meta, const int32_t* base,
                                                       int64_t V, int32_t* cols) {
  constexpr int P = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  int64_t j = 0, w = 0;
  for (; j + P <= V; j += P, ++w) {
    const uint32_t word = static_cast<uint32_t>(meta[w]);
    for (int k = 0; k < P; ++k)
      cols[j + k] = base[j + k] + static_cast<int32_t>((word >> (k * BITS)) & mask);
  }
  if (j < V) {
    const uint32_t word = static_cast<uint32_t>(meta[w]);
    for (int k = 0; j + k < V; ++k)
      cols[j + k] = base[j + k] + static_cast<int32_t>((word >> (k * BITS)) & mask);
  }
}

// With 4 bits per index m = 8 is the one pattern whose field can hold an index outside the
// group (8..15); a corrupt meta must not make the kernels read past x, so for m = 8 every word
// is checked (one AND) before any kernel runs. The check stays out of the kernels: an error
// thrown from inside a cloned kernel terminated the process instead of reaching Python.
void check_meta_indices(const NMLayout& L, const at::Tensor& meta) {
  if (L.m != 8) return;
  const int32_t* p = meta.data_ptr<int32_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  parallel_for(0, meta.numel(), parallel_grain(work_ns(0, sizeof(int32_t))), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      if (static_cast<uint32_t>(p[i]) & 0x88888888u) {
        int64_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {}
        return;
      }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(), "meta: row ", bad / L.W, ", word ",
              bad % L.W, " holds an in-group index >= m = 8");
}

// cols[0, V) = the columns of row `row`'s values.
__attribute__((always_inline)) inline void decode_row(const NMLayout& L, const int32_t* meta,
                                                      int64_t row, int32_t* cols) {
  const int32_t* mrow = meta + row * L.W;
  const int32_t* base = L.group_base.data();
  switch (L.bits) {
    case 1: decode_bits<1>(mrow, base, L.V, cols); break;
    case 2: decode_bits<2>(mrow, base, L.V, cols); break;
    default: decode_bits<4>(mrow, base, L.V, cols); break;
  }
}

template <typename V>
__attribute__((always_inline)) inline auto hsum(const V& v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(V) / sizeof(s)); ++i) s += v[i];
  return s;
}

__attribute__((always_inline)) inline v8f permute8(v8f x, v8i idx) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(x, idx);  // vpermps in the AVX2 clone
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = x[idx[i] & 7];
  return r;
#endif
}

// ---- one token: GEMV rows ----

constexpr v8i kShift2 = {0, 2, 4, 6, 8, 10, 12, 14};  // 2-bit fields of half a meta word

// x . S[row] for 2:4: a meta word holds 16 values = 8 groups = 32 columns. Value l of 8
// (4 groups, 16 columns) takes column (l / 2) * 4 + idx, i.e. lane (l / 2) * 4 % 8 + idx of
// the first (l < 4) or second 8 columns.
template <typename scalar_t>
__attribute__((always_inline)) inline float dot_24(const float* x, const scalar_t* v,
                                                   const int32_t* meta, int64_t V) {
  const v8i off = {0, 0, 4, 4, 0, 0, 4, 4};
  v8f a0 = {}, a1 = {};
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {
    const v8i w = v8i{} + meta[j >> 4];
    const float* xc = x + 2 * j;
    const v8i lo = ((w >> kShift2) & 3) + off, hi = ((w >> (kShift2 + 16)) & 3) + off;
    const v8f g0 = __builtin_shufflevector(permute8(vload(xc), lo), permute8(vload(xc + 8), lo),
                                           0, 1, 2, 3, 12, 13, 14, 15);
    const v8f g1 = __builtin_shufflevector(permute8(vload(xc + 16), hi),
                                           permute8(vload(xc + 24), hi), 0, 1, 2, 3, 12, 13, 14, 15);
    a0 += vload(v + j) * g0;
    a1 += vload(v + j + 8) * g1;
  }
  float s = hsum(a0 + a1);
  for (; j < V; ++j)
    s += float(v[j]) * x[j / 2 * 4 + ((static_cast<uint32_t>(meta[j >> 4]) >> ((j & 15) * 2)) & 3)];
  return s;
}

// x . S[row] for 1:4: 8 values are 8 groups = 32 columns = 4 vectors of x, value l taking
// lane (l % 2) * 4 + idx of vector l / 2.
template <typename scalar_t>
__attribute__((always_inline)) inline float dot_14(const float* x, const scalar_t* v,
                                                   const int32_t* meta, int64_t V) {
  const v8i off = {0, 4, 0, 4, 0, 4, 0, 4};
  v8f acc[2] = {};
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {
    const v8i w = v8i{} + meta[j >> 4];
    for (int h = 0; h < 2; ++h) {
      const v8i idx = ((w >> (kShift2 + 16 * h)) & 3) + off;
      const float* xc = x + 4 * j + 32 * h;
      const v8f ab = __builtin_shufflevector(permute8(vload(xc), idx), permute8(vload(xc + 8), idx),
                                             0, 1, 10, 11, 4, 5, 6, 7);
      const v8f cd = __builtin_shufflevector(permute8(vload(xc + 16), idx),
                                             permute8(vload(xc + 24), idx), 0, 1, 2, 3, 4, 5, 14, 15);
      acc[h] += vload(v + j + 8 * h) * __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 12, 13, 14, 15);
    }
  }
  float s = hsum(acc[0] + acc[1]);
  for (; j < V; ++j)
    s += float(v[j]) * x[j * 4 + ((static_cast<uint32_t>(meta[j >> 4]) >> ((j & 15) * 2)) & 3)];
  return s;
}

template <typename scalar_t>
__attribute__((always_inline)) inline void gemv_rows_impl(int64_t r0, int64_t r1, const float* x,
                                                          const scalar_t* values,
                                                          const int32_t* meta, const NMLayout& L,
                                                          const scalar_t* bias, scalar_t* y) {
  const int64_t V = L.V;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* v = values + r * V;
    const int32_t* mrow = meta + r * L.W;
    const float s = L.n == 2 ? dot_24(x, v, mrow, V) : dot_14(x, v, mrow, V);
    y[r] = static_cast<scalar_t>(bias ? s + float(bias[r]) : s);
  }
}

// ---- several tokens: token tiles of T = NV vectors ----

// acc[r][u] = sum_j values[r, j] * x^T[cols[r, j], t0 + u*width ...] for RB rows.
template <int NV, int RB, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void tile_rows(const scalar_t* values, const int32_t* cols,
                                                     int64_t V, const acc_t* xT, int64_t Np,
                                                     vec_t<acc_t> (&acc)[RB][NV]) {
  using Vec = vec_t<acc_t>;
  constexpr int Wd = VecOf<acc_t>::width;
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = Vec{};
  for (int64_t j = 0; j < V; ++j)
    for (int r = 0; r < RB; ++r) {
      const Vec vb = Vec{} + static_cast<acc_t>(values[r * V + j]);
      const acc_t* xp = xT + int64_t(cols[r * V + j]) * Np;
      for (int u = 0; u < NV; ++u) acc[r][u] += vb * vload(xp + u * Wd);
    }
}

template <int NV, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void forward_tile_impl(
    int64_t r0, int64_t r1, const acc_t* xT, int64_t Np, int64_t t0, int64_t nt,
    const scalar_t* values, const int32_t* meta, const NMLayout& L, const scalar_t* bias,
    scalar_t* y, int64_t rows, int32_t* cols) {
  constexpr int RB = NV == 1 ? 4 : NV == 2 ? 2 : 1;  // RB * NV accumulators in registers
  constexpr int Wd = VecOf<acc_t>::width;
  const int64_t V = L.V;
  const acc_t* xt = xT + t0;
  auto store = [&](int64_t r, auto& acc) {
    constexpr int rb = std::extent_v<std::remove_reference_t<decltype(acc)>>;
    for (int i = 0; i < rb; ++i) {
      const acc_t b = bias ? static_cast<acc_t>(bias[r + i]) : acc_t(0);
      for (int64_t t = 0; t < nt; ++t)
        y[(t0 + t) * rows + r + i] = static_cast<scalar_t>(acc[i][t / Wd][t % Wd] + b);
    }
  };
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) {
    for (int i = 0; i < RB; ++i) decode_row(L, meta, r + i, cols + i * V);
    vec_t<acc_t> acc[RB][NV];
    tile_rows<NV, RB>(values + r * V, cols, V, xt, Np, acc);
    store(r, acc);
  }
  for (; r < r1; ++r) {
    decode_row(L, meta, r, cols);
    vec_t<acc_t> acc[1][NV];
    tile_rows<NV, 1>(values + r * V, cols, V, xt, Np, acc);
    store(r, acc);
  }
}

// gxT[col, 0, T) += values[r, j] * gyT[r, t0 + (0, T)] for every value of rows [r0, r1).
template <int NV, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void scatter_tile_impl(int64_t r0, int64_t r1,
                                                             const acc_t* gyT, int64_t Np,
                                                             int64_t t0, const scalar_t* values,
                                                             const int32_t* meta,
                                                             const NMLayout& L, int32_t* cols,
                                                             acc_t* gxT) {
  using Vec = vec_t<acc_t>;
  constexpr int Wd = VecOf<acc_t>::width, T = NV * Wd;
  const int64_t V = L.V;
  for (int64_t r = r0; r < r1; ++r) {
    Vec g[NV];
    for (int u = 0; u < NV; ++u) g[u] = vload(gyT + r * Np + t0 + u * Wd);
    decode_row(L, meta, r, cols);
    const scalar_t* v = values + r * V;
    for (int64_t j = 0; j < V; ++j) {
      const Vec vb = Vec{} + static_cast<acc_t>(v[j]);
      acc_t* p = gxT + int64_t(cols[j]) * T;
      for (int u = 0; u < NV; ++u) {
        const Vec s = vload(p + u * Wd) + vb * g[u];
        std::memcpy(p + u * Wd, &s, sizeof(Vec));
      }
    }
  }
}

// grad_values[r, j] = gyT[r, 0, Np) . xT[col(r, j), 0, Np) for rows [r0, r1).
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void value_grads_impl(int64_t r0, int64_t r1,
                                                            const acc_t* gyT, const acc_t* xT,
                                                            int64_t Np, const int32_t* meta,
                                                            const NMLayout& L, int32_t* cols,
                                                            scalar_t* gv) {
  using Vec = vec_t<acc_t>;
  constexpr int Wd = VecOf<acc_t>::width;
  const int64_t V = L.V;
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(L, meta, r, cols);
    const acc_t* g = gyT + r * Np;
    for (int64_t j = 0; j < V; ++j) {
      const acc_t* xp = xT + int64_t(cols[j]) * Np;
      Vec s0 = {}, s1 = {};
      int64_t c = 0;
      for (; c + 2 * Wd <= Np; c += 2 * Wd) {
        s0 += vload(g + c) * vload(xp + c);
        s1 += vload(g + c + Wd) * vload(xp + c + Wd);
      }
      if (c < Np) s0 += vload(g + c) * vload(xp + c);
      gv[r * V + j] = static_cast<scalar_t>(hsum(s0 + s1));
    }
  }
}

// The cloned entry points (target_clones needs plain functions, one per dtype).
#define LEANFORMER_NM_TILE_KERNELS(acc_t, scalar_t)                                             \
  LEANFORMER_CLONES void forward_tile(int nv, int64_t r0, int64_t r1, const acc_t* xT,         \
                                      int64_t Np, int64_t t0, int64_t nt,                      \
                                      const scalar_t* values, const int32_t* meta,             \
                                      const NMLayout& L, const scalar_t* bias, scalar_t* y,    \
                                      int64_t rows, int32_t* cols) {                           \
    switch (nv) {                                                                              \
      case 1: forward_tile_impl<1>(r0, r1, xT, Np, t0, nt, values, meta, L, bias, y, rows, cols); break; \
      case 2: forward_tile_impl<2>(r0, r1, xT, Np, t0, nt, values, meta, L, bias, y, rows, cols); break; \
      default: forward_tile_impl<4>(r0, r1, xT, Np, t0, nt, values, meta, L, bias, y, rows, cols); break; \
    }                                                                                          \
  }                                                                                            \
  LEANFORMER_CLONES void scatter_tile(int nv, int64_t r0, int64_t r1, const acc_t* gyT,       \
                                      int64_t Np, int64_t t0, const scalar_t* values,          \
                                      const int32_t* meta, const NMLayout& L, int32_t* cols,   \
                                      acc_t* gxT) {                                            \
    switch (nv) {                                                                              \
      case 1: scatter_tile_impl<1>(r0, r1, gyT, Np, t0, values, meta, L, cols, gxT); break;   \
      case 2: scatter_tile_impl<2>(r0, r1, gyT, Np, t0, values, meta, L, cols, gxT); break;   \
      default: scatter_tile_impl<4>(r0, r1, gyT, Np, t0, values, meta, L, cols, gxT); break;  \
    }                                                                                          \
  }                                                                                            \
  LEANFORMER_CLONES void value_grads(int64_t r0, int64_t r1, const acc_t* gyT, const acc_t* xT, \
                                     int64_t Np, const int32_t* meta, const NMLayout& L,       \
                                     int32_t* cols, scalar_t* gv) {                            \
    value_grads_impl(r0, r1, gyT, xT, Np, meta, L, cols, gv);                                  \
  }
LEANFORMER_NM_TILE_KERNELS(float, float)
LEANFORMER_NM_TILE_KERNELS(float, c10::BFloat16)
LEANFORMER_NM_TILE_KERNELS(float, c10::Half)
LEANFORMER_NM_TILE_KERNELS(double, double)
#undef LEANFORMER_NM_TILE_KERNELS

#define LEANFORMER_NM_GEMV_KERNEL(scalar_t)                                                      \
  LEANFORMER_CLONES void gemv_rows(int64_t r0, int64_t r1, const float* x,                       \
                                   const scalar_t* values, const int32_t* meta,                  \
                                   const NMLayout& L, const scalar_t* bias, scalar_t* y) {       \
    gemv_rows_impl(r0, r1, x, values, meta, L, bias, y);                                         \
  }
LEANFORMER_NM_GEMV_KERNEL(float)
LEANFORMER_NM_GEMV_KERNEL(c10::BFloat16)
LEANFORMER_NM_GEMV_KERNEL(c10::Half)
#undef LEANFORMER_NM_GEMV_KERNEL

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// ---- one token on AVX-512: 16 values per meta word in one zmm ----
//
// A meta word's 16 two-bit fields, shifted into the 16 lanes (vpsrlvd) and or-ed onto each
// lane's group offset (vpternlogd), index the 32 (2:4) or 64 (1:4) columns of x the word
// covers: one vpermt2ps picks the 2:4 values' columns from two zmm of x; 1:4 takes two (the
// index's low 5 bits serve both halves) and a blend. Then one 16-wide FMA. RB rows run at
// once: their FMA chains overlap, and x's vectors are loaded once for all of them.
// (Intrinsics: GCC inlines target-specific intrinsics only into functions of the same target.)

LEANFORMER_AVX512 __attribute__((always_inline)) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
LEANFORMER_AVX512 __attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));  // bf16 is fp32's top half
}
LEANFORMER_AVX512 __attribute__((always_inline)) inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int NUM, int RB, typename scalar_t>
LEANFORMER_AVX512 __attribute__((always_inline)) inline void gemv_block_avx512(
    int64_t r, const float* x, const scalar_t* values, const int32_t* meta, const NMLayout& L,
    const scalar_t* bias, scalar_t* y) {
  const int64_t V = L.V, W = L.W;
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  // value l's first column within the word's span: its group's, (l / 2) * 4 (2:4) or l * 4 (1:4)
  const __m512i base = NUM == 2 ? _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28)
                                : _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
  const __m512i three = _mm512_set1_epi32(3);
  const scalar_t* v[RB];
  const int32_t* mw[RB];
  __m512 acc[RB];
  for (int i = 0; i < RB; ++i) {
    v[i] = values + (r + i) * V;
    mw[i] = meta + (r + i) * W;
    acc[i] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {
    const float* xc = x + j * (4 / NUM);  // 32 (2:4) or 64 (1:4) columns
    const __m512 x0 = _mm512_loadu_ps(xc), x1 = _mm512_loadu_ps(xc + 16);
    __m512 x2, x3;
    if constexpr (NUM == 1) {
      x2 = _mm512_loadu_ps(xc + 32);
      x3 = _mm512_loadu_ps(xc + 48);
    }
    for (int i = 0; i < RB; ++i) {
      const __m512i fields = _mm512_srlv_epi32(_mm512_set1_epi32(mw[i][j >> 4]), shift);
      const __m512i idx = _mm512_ternarylogic_epi32(fields, three, base, 0xEA);  // (f & 3) | base
      __m512 g = _mm512_permutex2var_ps(x0, idx, x1);
      if constexpr (NUM == 1) g = _mm512_mask_blend_ps(0xFF00, g, _mm512_permutex2var_ps(x2, idx, x3));
      acc[i] = _mm512_fmadd_ps(load16(v[i] + j), g, acc[i]);
    }
  }
  for (int i = 0; i < RB; ++i) {
    float s = _mm512_reduce_add_ps(acc[i]);
    for (int64_t t = j; t < V; ++t)
      s += float(v[i][t]) * x[t / NUM * 4 + ((static_cast<uint32_t>(mw[i][t >> 4]) >> ((t & 15) * 2)) & 3)];
    y[r + i] = static_cast<scalar_t>(bias ? s + float(bias[r + i]) : s);
  }
}

template <int NUM, typename scalar_t>
LEANFORMER_AVX512 __attribute__((always_inline)) inline void gemv_rows_avx512_impl(
    int64_t r0, int64_t r1, const float* x, const scalar_t* values, const int32_t* meta,
    const NMLayout& L, const scalar_t* bias, scalar_t* y) {
  constexpr int RB = 4;
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) gemv_block_avx512<NUM, RB>(r, x, values, meta, L, bias, y);
  for (; r < r1; ++r) gemv_block_avx512<NUM, 1>(r, x, values, meta, L, bias, y);
}

#define LEANFORMER_NM_GEMV_AVX512_KERNEL(scalar_t)                                               \
  LEANFORMER_AVX512 void gemv_rows_avx512(int64_t r0, int64_t r1, const float* x,                 \
                                          const scalar_t* values, const int32_t* meta,            \
                                          const NMLayout& L, const scalar_t* bias, scalar_t* y) { \
    if (L.n == 2)                                                                                 \
      gemv_rows_avx512_impl<2>(r0, r1, x, values, meta, L, bias, y);                              \
    else                                                                                          \
      gemv_rows_avx512_impl<1>(r0, r1, x, values, meta, L, bias, y);                              \
  }
LEANFORMER_NM_GEMV_AVX512_KERNEL(float)
LEANFORMER_NM_GEMV_AVX512_KERNEL(c10::BFloat16)
LEANFORMER_NM_GEMV_AVX512_KERNEL(c10::Half)
#undef LEANFORMER_NM_GEMV_AVX512_KERNEL
#else
// Without GCC on x86-64 cpu_has_avx512() is false and this is never called.
template <typename scalar_t>
void gemv_rows_avx512(int64_t r0, int64_t r1, const float* x, const scalar_t* values,
                      const int32_t* meta, const NMLayout& L, const scalar_t* bias, scalar_t* y) {
  gemv_rows(r0, r1, x, values, meta, L, bias, y);
}
#endif

// ---- non-finite inputs: the dense reference's NaN where a pruned zero meets inf or NaN ----

// The exponent bits of a storage type: all ones means inf or NaN. An integer test on the raw
// bits, so the scan vectorizes and needs no conversion.
template <typename scalar_t> struct ExponentBits;
template <> struct ExponentBits<float> { using U = uint32_t; static constexpr U mask = 0x7f800000u; };
template <> struct ExponentBits<double> { using U = uint64_t; static constexpr U mask = 0x7ff0000000000000ull; };
template <> struct ExponentBits<c10::BFloat16> { using U = uint16_t; static constexpr U mask = 0x7f80u; };
template <> struct ExponentBits<c10::Half> { using U = uint16_t; static constexpr U mask = 0x7c00u; };

template <typename scalar_t>
inline bool is_nonfinite(scalar_t v) {
  using B = ExponentBits<scalar_t>;
  typename B::U u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & B::mask) == B::mask;
}

// The rows of a dense [N, C] matrix holding an inf or NaN, ascending (usually none).
template <typename scalar_t>
std::vector<int64_t> nonfinite_rows(const scalar_t* p, int64_t N, int64_t C) {
  using B = ExponentBits<scalar_t>;
  std::vector<char> bad(N, 0);
  parallel_for(0, N, parallel_grain(work_ns(0, double(C) * sizeof(scalar_t))), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto* row = reinterpret_cast<const typename B::U*>(p + t * C);
      bool any = false;
      for (int64_t c = 0; c < C; ++c) any |= (row[c] & B::mask) == B::mask;
      bad[t] = any;
    }
  });
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < N; ++t)
    if (bad[t]) rows.push_back(t);
  return rows;
}

// Whether row r of S keeps column c (holds one of its values; a pruned entry is a zero).
inline bool keeps_column(const NMLayout& L, const int32_t* meta, int64_t r, int64_t c) {
  const int64_t g = c / L.m, in_group = c % L.m;
  const uint32_t field = (1u << L.bits) - 1;
  const int32_t* mrow = meta + r * L.W;
  for (int64_t j = g * L.n; j < (g + 1) * L.n; ++j) {
    const int64_t bit = j * L.bits;
    if (((static_cast<uint32_t>(mrow[bit >> 5]) >> (bit & 31)) & field) == in_group) return true;
  }
  return false;
}

// y = x @ S^T from the sparse kernels, made the dense product's for the tokens with an inf or
// NaN in x: y[t, r] is NaN where row r prunes a column c with x[t, c] non-finite (0 * inf and
// 0 * NaN are NaN). Where row r keeps every such column the kernel's sum is already IEEE's.
template <typename scalar_t>
void fix_nonfinite_tokens(const scalar_t* x, int64_t N, const int32_t* meta, const NMLayout& L,
                          int64_t rows, scalar_t* y) {
  const std::vector<int64_t> tokens = nonfinite_rows(x, N, L.K);
  if (tokens.empty()) return;
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
  for (const int64_t t : tokens) {
    std::vector<int64_t> bad_cols;
    for (int64_t c = 0; c < L.K; ++c)
      if (is_nonfinite(x[t * L.K + c])) bad_cols.push_back(c);
    const double row_ns = work_ns(0, 0, double(bad_cols.size()) * L.n);
    parallel_for(0, rows, parallel_grain(row_ns), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (const int64_t c : bad_cols)
          if (!keeps_column(L, meta, r, c)) {
            y[t * rows + r] = nan;
            break;
          }
    });
  }
}

// grad_x = grad_y @ S from the sparse kernels, made the dense product's for the tokens with an
// inf or NaN in grad_y: grad_x[t, c] is NaN where a row r with grad_y[t, r] non-finite prunes c.
template <typename scalar_t>
void fix_nonfinite_grad_tokens(const scalar_t* grad_y, int64_t N, int64_t rows, const int32_t* meta,
                               const NMLayout& L, scalar_t* grad_x) {
  const std::vector<int64_t> tokens = nonfinite_rows(grad_y, N, rows);
  if (tokens.empty()) return;
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
  std::vector<char> kept(L.K);
  std::vector<int32_t> cols(L.V);
  for (const int64_t t : tokens)
    for (int64_t r = 0; r < rows; ++r) {
      if (!is_nonfinite(grad_y[t * rows + r])) continue;
      std::fill(kept.begin(), kept.end(), 0);
      decode_row(L, meta, r, cols.data());
      for (int64_t j = 0; j < L.V; ++j) kept[cols[j]] = 1;
      for (int64_t c = 0; c < L.K; ++c)
        if (!kept[c]) grad_x[t * L.K + c] = nan;
    }
}

// ---- driver ----

// Vectors of tokens per tile: as few as cover the tokens, at most 4.
template <typename acc_t>
int tile_vectors(int64_t N) {
  constexpr int Wd = VecOf<acc_t>::width;
  return N <= Wd ? 1 : N <= 2 * Wd ? 2 : 4;
}

// src [N, C] -> dst [C, Np] in acc_t, tokens N..Np zero.
template <typename acc_t, typename scalar_t>
at::Tensor transpose_padded(const scalar_t* src, int64_t N, int64_t C, int64_t Np,
                            at::ScalarType acc_dtype) {
  at::Tensor dst = at::empty({C, Np}, at::TensorOptions().dtype(acc_dtype));
  acc_t* d = dst.data_ptr<acc_t>();
  parallel_for(0, C, parallel_grain(work_ns(0, 0, double(Np))), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t t = 0; t < N; ++t) d[c * Np + t] = static_cast<acc_t>(src[t * C + c]);
      for (int64_t t = N; t < Np; ++t) d[c * Np + t] = acc_t(0);
    }
  });
  return dst;
}

constexpr int64_t kRowBlock = 32;  // rows per task: a few per thread at 4096 rows, many tasks
constexpr int64_t kGemvUnit = 16;  // the one-token GEMV's rows per split_run unit (4 blocks of the AVX-512 kernel's 4)

template <typename scalar_t>
void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
             const at::Tensor& bias_t, const NMLayout& L, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* bias = bias_t.defined() ? bias_t.data_ptr<scalar_t>() : nullptr;
  const int64_t N = x.size(0), rows = values.size(0), K = L.K, V = L.V;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const int32_t* mp = meta.data_ptr<int32_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  if constexpr (std::is_same_v<acc_t, float>) {
    // 2:4 and 1:4 have a GEMV (dot_24 / dot_14 decode only those patterns' meta words); other
    // patterns at one token (3:4 included) are faster through the tile kernel (one vector lane
    // used) than gathering x's columns (measured: 2:8 at 4096 x 4096, 0.7x dense).
    if (N == 1 && L.m == 4 && (L.n == 1 || L.n == 2)) {
      auto xf = std::make_shared<std::vector<float>>(K);
      for (int64_t k = 0; k < K; ++k) (*xf)[k] = static_cast<float>(xp[k]);
      const bool avx512 = cpu_has_avx512();
      if constexpr (std::is_same_v<scalar_t, float>) {
        // float32: the rows in chunks on the calling thread and split_run's spinning helpers
        // (split_pool.h), as quantized_linear's tiles: a GEMV streams its weight from memory,
        // which one core does at about half the rate two do, and a helper the host deschedules
        // costs a chunk computed twice, not a wait. A chunk's rows are computed into a
        // thread-local row of outputs and copied to dst: the same bits on any thread.
        const int64_t units = (rows + kGemvUnit - 1) / kGemvUnit, per_chunk = split_units_per_chunk(units);
        auto run = [xf, keep = storages_of(values, meta, bias_t), vp, mp, bias, L, rows, avx512,
                    chunk_rows = per_chunk * kGemvUnit](int64_t c, float* dst, int64_t, bool) {
          thread_local std::vector<float> buf;
          buf.resize(size_t(rows));
          const int64_t r0 = c * chunk_rows, r1 = std::min(rows, r0 + chunk_rows);
          if (avx512)
            gemv_rows_avx512(r0, r1, xf->data(), vp, mp, L, bias, buf.data());
          else
            gemv_rows(r0, r1, xf->data(), vp, mp, L, bias, buf.data());
          std::copy(buf.data() + r0, buf.data() + r1, dst);
        };
        split_run(make_split_job(1, rows, per_chunk, kGemvUnit, yp, std::move(run)));
      } else {
        const double row_ns = work_ns(V, V * sizeof(scalar_t) + L.W * sizeof(int32_t));
        parallel_for(0, rows, parallel_grain(row_ns), [&](int64_t r0, int64_t r1) {
          if (avx512)
            gemv_rows_avx512(r0, r1, xf->data(), vp, mp, L, bias, yp);
          else
            gemv_rows(r0, r1, xf->data(), vp, mp, L, bias, yp);
        });
      }
      fix_nonfinite_tokens(xp, N, mp, L, rows, yp);
      return;
    }
  }
  const int nv = tile_vectors<acc_t>(N);
  const int64_t T = nv * VecOf<acc_t>::width, Np = round_up(N, T), tiles = Np / T;
  const at::Tensor xT = transpose_padded<acc_t>(xp, N, K, Np, c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* xTp = xT.data_ptr<acc_t>();
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  // Tile-major tasks: a thread's consecutive tasks share a tile of x^T in cache.
  const double task_ns = work_ns(double(kRowBlock) * V * T, kRowBlock * (V * sizeof(scalar_t) + L.W * 4));
  parallel_for(0, tiles * blocks, parallel_grain(task_ns), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cols(4 * V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / blocks, b = task % blocks, t0 = tile * T;
      forward_tile(nv, b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), xTp, Np, t0,
                   std::min(T, N - t0), vp, mp, L, bias, yp, rows, cols.data());
    }
  });
  fix_nonfinite_tokens(xp, N, mp, L, rows, yp);
}

template <typename scalar_t>
void backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& values,
              const at::Tensor& meta, const NMLayout& L, at::Tensor* grad_x,
              at::Tensor* grad_values) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t N = x.size(0), rows = values.size(0), K = L.K, V = L.V;
  const int nv = tile_vectors<acc_t>(N);
  const int64_t T = nv * VecOf<acc_t>::width, Np = round_up(N, T), tiles = Np / T;
  const at::Tensor gyT = transpose_padded<acc_t>(grad_y.data_ptr<scalar_t>(), N, rows, Np, acc_dtype);
  const acc_t* gyTp = gyT.data_ptr<acc_t>();
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const int32_t* mp = meta.data_ptr<int32_t>();
  if (grad_values) {
    const at::Tensor xT = transpose_padded<acc_t>(x.data_ptr<scalar_t>(), N, K, Np, acc_dtype);
    const acc_t* xTp = xT.data_ptr<acc_t>();
    scalar_t* gvp = grad_values->data_ptr<scalar_t>();
    parallel_for(0, rows, parallel_grain(work_ns(double(V) * Np, 0, V)), [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> cols(V);
      value_grads(r0, r1, gyTp, xTp, Np, mp, L, cols.data(), gvp);
    });
  }
  if (grad_x) {
    // Row splits per tile, so that a single tile (decode) still uses every thread, where the
    // work is worth a parallel region at all.
    const double row_ns = work_ns(double(V) * T, V * sizeof(scalar_t), V);
    const int64_t threads = planned_threads(row_ns * rows * tiles);
    const int64_t splits = std::clamp<int64_t>((threads + tiles - 1) / tiles, 1,
                                               std::max<int64_t>(1, rows / 16));
    const int64_t split_rows = (rows + splits - 1) / splits;
    at::Tensor parts = at::zeros({tiles, splits, K, T}, at::TensorOptions().dtype(acc_dtype));
    acc_t* pp = parts.data_ptr<acc_t>();
    parallel_for(0, tiles * splits, parallel_grain(row_ns * split_rows), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> cols(V);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tile = task / splits, s = task % splits;
        scatter_tile(nv, s * split_rows, std::min(rows, (s + 1) * split_rows), gyTp, Np, tile * T,
                     vp, mp, L, cols.data(), pp + task * K * T);
      }
    });
    scalar_t* gxp = grad_x->data_ptr<scalar_t>();
    parallel_for(0, N, parallel_grain(work_ns(0, 0, double(K) * splits)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const acc_t* part = pp + (t / T) * splits * K * T + t % T;
        for (int64_t k = 0; k < K; ++k) {
          acc_t s = 0;
          for (int64_t p = 0; p < splits; ++p) s += part[(p * K + k) * T];
          gxp[t * K + k] = static_cast<scalar_t>(s);
        }
      }
    });
    fix_nonfinite_grad_tokens(grad_y.data_ptr<scalar_t>(), N, rows, mp, L, gxp);
  }
}

// ---- many tokens: dense ----

// From this many tokens on, unpacking S to dense and calling the BLAS GEMM (at::linear /
// at::mm) was measured faster than the token-tiled kernel: the GEMM is register- and
// cache-blocked, while every sparse value gathers a random column of x^T. The sparser the
// pattern the later dense pays off: 16 (m/n)^2 tokens, i.e. 64 for 2:4 and 256 for 1:4
// (4096 x 4096 fp32 on 2 loaded cores; unpacking, mostly the page faults of the fresh 64 MB
// dense weight, cost 60-100 ms there, about the GEMM of 64 tokens). Mirrored, and logged, by the Python wrapper
// (leanformer/ops/nm_sparse_linear.py dense_min_tokens); tests check the two agree.
int64_t dense_min_tokens(int64_t n, int64_t m) { return 16 * m * m / (n * n); }

// S [rows, K] with zeros outside the pattern.
template <typename scalar_t>
void unpack_rows(const scalar_t* values, const int32_t* meta, const NMLayout& L, int64_t rows,
                 scalar_t* dense) {
  parallel_for(0, rows, parallel_grain(work_ns(0, L.K * sizeof(scalar_t), L.V)), [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> cols(L.V);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* d = dense + r * L.K;
      std::fill(d, d + L.K, scalar_t(0));
      decode_row(L, meta, r, cols.data());
      for (int64_t j = 0; j < L.V; ++j) d[cols[j]] = values[r * L.V + j];
    }
  });
}

at::Tensor unpack_dense(const at::Tensor& values, const at::Tensor& meta, const NMLayout& L) {
  at::Tensor dense = at::empty({values.size(0), L.K}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "nm_unpack", [&] {
    unpack_rows(values.data_ptr<scalar_t>(), meta.data_ptr<int32_t>(), L, values.size(0),
                dense.data_ptr<scalar_t>());
  });
  return dense;
}

// grad_values[r, j] = grad_S[r, col(r, j)].
at::Tensor gather_values(const at::Tensor& grad_dense, const at::Tensor& meta, const NMLayout& L) {
  at::Tensor out = at::empty({grad_dense.size(0), L.V}, grad_dense.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "nm_gather", [&] {
    const scalar_t* g = grad_dense.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int32_t* mp = meta.data_ptr<int32_t>();
    parallel_for(0, out.size(0), parallel_grain(work_ns(0, 0, L.V)), [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> cols(L.V);
      for (int64_t r = r0; r < r1; ++r) {
        decode_row(L, mp, r, cols.data());
        for (int64_t j = 0; j < L.V; ++j) o[r * L.V + j] = g[r * L.K + cols[j]];
      }
    });
  });
  return out;
}

// The tokens of x [..., K]: the product of its leading dims (reshape(-1, K) is ambiguous at K = 0).
int64_t leading_size(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

at::Tensor nm_sparse_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const std::optional<at::Tensor>& bias,
                                int64_t n, int64_t m) {
  check_nm_sparse_linear_inputs(x, values, meta, bias, n, m);
  const int64_t K = x.size(-1), rows = values.size(0), tokens = leading_size(x);
  const at::Tensor x2 = x.reshape({tokens, K}).contiguous();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = rows;
  at::Tensor y = at::empty({x2.size(0), rows}, x.options());
  if (y.numel() == 0) return y.view(out_shape);
  const NMLayout L = make_layout(n, m, K);
  const at::Tensor vc = values.contiguous(), mc = meta.contiguous();
  check_meta_indices(L, mc);
  if (x2.size(0) >= dense_min_tokens(n, m)) return at::linear(x, unpack_dense(vc, mc, L), bias);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nm_sparse_linear", [&] {
    forward<scalar_t>(x2, vc, mc, bc, L, y);
  });
  return y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> nm_sparse_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
    int64_t n, int64_t m, std::array<bool, 2> output_mask) {
  check_nm_sparse_linear_backward_inputs(grad_y, x, values, meta, n, m);
  const int64_t K = x.size(-1), rows = values.size(0), tokens = leading_size(x);
  const at::Tensor x2 = x.reshape({tokens, K}).contiguous();
  const at::Tensor gy2 = grad_y.reshape({tokens, rows}).contiguous();
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_values =
      output_mask[1] ? at::empty(values.sizes(), values.options()) : values.new_empty({0});
  if (x2.size(0) == 0 || rows == 0 || K == 0) {  // nothing to sum: the gradients are zero
    grad_x.zero_();
    grad_values.zero_();
    return {grad_x, grad_values};
  }
  const NMLayout L = make_layout(n, m, K);
  const at::Tensor vc = values.contiguous(), mc = meta.contiguous();
  check_meta_indices(L, mc);
  if (x2.size(0) >= dense_min_tokens(n, m)) {
    if (output_mask[0]) grad_x.view({-1, K}).copy_(at::mm(gy2, unpack_dense(vc, mc, L)));
    if (output_mask[1]) grad_values = gather_values(at::mm(gy2.t(), x2), mc, L);
    return {grad_x, grad_values};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "nm_sparse_linear_backward", [&] {
    backward<scalar_t>(gy2, x2, vc, mc, L, output_mask[0] ? &grad_x : nullptr,
                       output_mask[1] ? &grad_values : nullptr);
  });
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("nm_sparse_linear", &nm_sparse_linear_cpu);
  m.impl("nm_sparse_linear_backward", &nm_sparse_linear_backward_cpu);
}

}  // namespace leanformer
