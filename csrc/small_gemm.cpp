#include "small_gemm.h"

#include <cstring>

namespace leanformer {
namespace {

template <typename T> struct Vec;
template <> struct Vec<float> { using type = v8f; static constexpr int width = 8; };
template <> struct Vec<double> { using type = v4d; static constexpr int width = 4; };

// MR rows x kGemmColBlock columns of C, accumulators in registers for the whole K loop.
// A is read as scalars (broadcast), so A^T costs nothing more than A.
template <typename T, int MR, bool TransA>
__attribute__((always_inline)) inline void block(int64_t K, const T* A, int64_t lda,
                                                 const T* B, int64_t ldb, T* C, int64_t ldc,
                                                 bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int NV = static_cast<int>(kGemmColBlock) / W;
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
}

template <typename T, bool TransA>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const T* A,
                                                     int64_t lda, const T* B, int64_t ldb, T* C,
                                                     int64_t ldc, bool accumulate) {
  // 6 x 16 floats keeps 12 accumulators in flight: enough to hide FMA latency on two ports.
  constexpr int MR = 6;
  for (int64_t j = 0; j < N; j += kGemmColBlock) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      const T* a = TransA ? A + i : A + i * lda;
      block<T, MR, TransA>(K, a, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    }
    const T* a = TransA ? A + i : A + i * lda;
    T* c = C + i * ldc + j;
    switch (M - i) {
      case 5: block<T, 5, TransA>(K, a, lda, B + j, ldb, c, ldc, accumulate); break;
      case 4: block<T, 4, TransA>(K, a, lda, B + j, ldb, c, ldc, accumulate); break;
      case 3: block<T, 3, TransA>(K, a, lda, B + j, ldb, c, ldc, accumulate); break;
      case 2: block<T, 2, TransA>(K, a, lda, B + j, ldb, c, ldc, accumulate); break;
      case 1: block<T, 1, TransA>(K, a, lda, B + j, ldb, c, ldc, accumulate); break;
      default: break;
    }
  }
}

}  // namespace

LEANFORMER_CLONES void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A,
                            int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                            bool accumulate) {
  if (trans_a)
    gemm_impl<float, true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_impl<float, false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

LEANFORMER_CLONES void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A,
                            int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc,
                            bool accumulate) {
  if (trans_a)
    gemm_impl<double, true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    gemm_impl<double, false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace leanformer
