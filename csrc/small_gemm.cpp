#include "small_gemm.h"

#include <cstdlib>
#include <cstring>

namespace leanformer {
namespace {

// MR rows x NV vectors of C, accumulators in registers for the whole K loop. A is read as
// scalars (broadcast), so A^T costs nothing more than A.
template <typename V, typename T, int NV, int MR, bool TransA, bool ColMax = false>
__attribute__((always_inline)) inline void block(int64_t K, const T* A, int64_t lda, const T* B,
                                                 int64_t ldb, T* C, int64_t ldc, bool accumulate,
                                                 T* colmax = nullptr) {
  constexpr int W = sizeof(V) / sizeof(T);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        std::memcpy(&acc[r][v], C + r * ldc + v * W, sizeof(V));
      else
        acc[r][v] = V{};
    }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], B + k * ldb + v * W, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      // x - 0 == x exactly, so this folds to one broadcast (x + 0 does not: -0 + 0 = +0).
      const V av = (TransA ? A[k * lda + r] : A[r * lda + k]) - V{};
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * ldc + v * W, &acc[r][v], sizeof(V));
  if constexpr (ColMax) {  // while the tile is still in registers
    for (int v = 0; v < NV; ++v) {
      V mx;
      std::memcpy(&mx, colmax + v * W, sizeof(V));
      for (int r = 0; r < MR; ++r) mx = acc[r][v] > mx ? acc[r][v] : mx;
      std::memcpy(colmax + v * W, &mx, sizeof(V));
    }
  }
}

// The last rows % MR rows of a column block, with a block of exactly that height.
template <typename V, typename T, int NV, int R, bool TransA, bool ColMax>
__attribute__((always_inline)) inline void tail_rows(int64_t rows, int64_t K, const T* A, int64_t lda,
                                                     const T* B, int64_t ldb, T* C, int64_t ldc,
                                                     bool accumulate, T* colmax) {
  if constexpr (R > 0) {
    if (rows == R)
      block<V, T, NV, R, TransA, ColMax>(K, A, lda, B, ldb, C, ldc, accumulate, colmax);
    else
      tail_rows<V, T, NV, R - 1, TransA, ColMax>(rows, K, A, lda, B, ldb, C, ldc, accumulate, colmax);
  }
}

template <typename V, typename T, int NV, int MR, bool TransA, bool ColMax>
__attribute__((always_inline)) inline void column_block(int64_t M, int64_t K, const T* A, int64_t lda,
                                                        const T* B, int64_t ldb, T* C, int64_t ldc,
                                                        bool accumulate, T* colmax) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    block<V, T, NV, MR, TransA, ColMax>(K, TransA ? A + i : A + i * lda, lda, B, ldb, C + i * ldc, ldc,
                                        accumulate, colmax);
  tail_rows<V, T, NV, MR - 1, TransA, ColMax>(M - i, K, TransA ? A + i : A + i * lda, lda, B, ldb, C + i * ldc,
                                              ldc, accumulate, colmax);
}

// Columns in blocks of NV vectors (NV * W >= kGemmColBlock), the rest one kGemmColBlock at a time.
template <typename V, typename T, int NV, int MR, int MR_TAIL, bool TransA, bool ColMax = false>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                                                     const T* B, int64_t ldb, T* C, int64_t ldc,
                                                     bool accumulate, T* colmax = nullptr) {
  constexpr int64_t W = sizeof(V) / sizeof(T), NB = NV * W, NV_TAIL = kGemmColBlock / W;
  static_assert(NB % kGemmColBlock == 0 && kGemmColBlock % W == 0);
  int64_t j = 0;
  for (; j + NB <= N; j += NB)
    column_block<V, T, NV, MR, TransA, ColMax>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate,
                                               ColMax ? colmax + j : nullptr);
  for (; j < N; j += kGemmColBlock)
    column_block<V, T, NV_TAIL, MR_TAIL, TransA, ColMax>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate,
                                                         ColMax ? colmax + j : nullptr);
}

template <typename V, typename T, int NV, int MR, int MR_TAIL>
__attribute__((always_inline)) inline void gemm_any(bool trans_a, int64_t M, int64_t N, int64_t K, const T* A,
                                                    int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                                    bool accumulate) {
  if (trans_a)
    gemm_impl<V, T, NV, MR, MR_TAIL, true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_impl<V, T, NV, MR, MR_TAIL, false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// AVX-512: 6 rows x 4 zmm (24 accumulators of the 32 registers, 10 loads per 24 FMAs): at
// 64 x 64 x 64 tiles about twice the AVX2 tile's rate; a last 16-float column block takes
// one zmm per row, 12 rows.
LEANFORMER_AVX512 void gemm_avx512(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_any<v16f, float, 4, 6, 12>(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LEANFORMER_AVX512 void gemm_avx512(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                                   const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_any<v8d, double, 4, 6, 12>(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LEANFORMER_AVX512 void gemm_colmax_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                          const float* B, int64_t ldb, float* C, int64_t ldc, float* colmax) {
  gemm_impl<v16f, float, 4, 6, 12, false, true>(M, N, K, A, lda, B, ldb, C, ldc, false, colmax);
}

// AVX2 (and the portable default): 6 x 16 floats keeps 12 accumulators in flight, enough to
// hide FMA latency on two ports.
LEANFORMER_CLONES void gemm_avx2(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_any<v8f, float, 2, 6, 6>(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LEANFORMER_CLONES void gemm_avx2(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                                 const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_any<v4d, double, 4, 6, 6>(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LEANFORMER_CLONES void gemm_colmax_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                        const float* B, int64_t ldb, float* C, int64_t ldc, float* colmax) {
  gemm_impl<v8f, float, 2, 6, 6, false, true>(M, N, K, A, lda, B, ldb, C, ldc, false, colmax);
}

}  // namespace

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  // LEANFORMER_DISABLE_AVX512=1 runs the AVX2 tiles on an AVX-512 CPU (tests cover both).
  // x86-64-v4, feature by feature (older GCCs lack the level names here).
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && !std::getenv("LEANFORMER_DISABLE_AVX512");
  return yes;
#else
  return false;
#endif
}

const char* cpu_vector_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (cpu_has_avx512()) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "portable";
}

template <typename T>
void gemm_dispatch(bool trans_a, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (cpu_has_avx512())
    gemm_avx512(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_avx2(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_dispatch(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_dispatch(trans_a, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_colmax(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, float* colmax) {
  if (cpu_has_avx512())
    gemm_colmax_avx512(M, N, K, A, lda, B, ldb, C, ldc, colmax);
  else
    gemm_colmax_avx2(M, N, K, A, lda, B, ldb, C, ldc, colmax);
}

}  // namespace leanformer
