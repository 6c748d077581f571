// Register-blocked GEMM for the small, cache-resident tiles of chunked kernels
// (64 x 64 x D). libtorch does not export its BLAS entry points, and calling at::mm
// per tile costs more in dispatch than the tile's arithmetic.
#pragma once

#include <cstdint>

namespace leanformer {

// 256-bit GCC/Clang vectors: AVX2 registers in the x86-64-v3 clone, two SSE registers
// (or NEON pairs) elsewhere, with no intrinsics tied to one ISA.
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
// 512-bit vectors: only for code compiled with an AVX-512 target (see cpu_has_avx512), which
// elsewhere GCC would lower to pairs or quads of narrower registers.
typedef float v16f __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));

// One binary for every x86-64 CPU: the loader picks the AVX2+FMA clone where it runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LEANFORMER_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define LEANFORMER_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define LEANFORMER_CLONES
#define LEANFORMER_AVX512
#endif

// The running CPU has AVX-512 (x86-64-v4) and LEANFORMER_DISABLE_AVX512 is unset: callers pick
// their 512-bit entry points by it.
bool cpu_has_avx512();
// "avx512", "avx2" (the x86-64-v3 clones) or "portable".
const char* cpu_vector_isa();

// Tile requirement: N % kGemmColBlock == 0 (callers pad); any M and K.
constexpr int64_t kGemmColBlock = 16;

// C[M, N] (+)= op(A) * B[K, N], op(A) = A[M, K] or, with trans_a, A[K, M]^T. Row-major,
// leading dimensions lda, ldb, ldc; AVX-512 tiles where the CPU has them.
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
          const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate);

// C[M, N] = A[M, K] * B[K, N] as gemm, and colmax[j] = max(colmax[j], max_i C[i, j]) taken
// while each tile is still in registers: the running maximum of an online softmax over the
// rows (keys) without another pass over C. N % kGemmColBlock == 0.
void gemm_colmax(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, float* colmax);

// dst[cols, rows] = src[rows, cols]^T (row-major, dense).
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace leanformer
