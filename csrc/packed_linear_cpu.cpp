// packed_linear on the CPU: y = x @ W^T + bias for a few rows of x (decoding: one token, or a
// token tree of a few dozen), with W prepacked into 32-column panels [ceil(N/32), K, 32].
// At such sizes at::linear spends most of its time repacking W for every call (MKL packs B
// per GEMM); here each panel is contiguous, so a 12-row x 32-column tile streams it once per
// 12 rows with 24 accumulators in registers. Measured on the 2-core AVX-512 dev machine
// (19 x 256 -> 1024): about twice at::linear's rate. On the 2-core AMD EPYC (AVX2, 6-row x
// 16-column tiles) at 19 rows: 1.4-2.0x F.linear, the SwiGLU ~2x F.linear + silu + product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#include "grain.h"
#include "packed_linear_checks.h"
#include "small_gemm.h"
#include "split_pool.h"
#include "vector_exp.h"

namespace leanformer {
namespace {

// MR rows x a stripe of NV vectors (W lanes each) of one panel: C[r, 0:NV W] = bias + sum_k
// A[r, k] * B[k, 0:NV W], B's rows kPanel apart. Accumulators, the stripe's row and the
// broadcast must all fit the register file (16 on AVX2): one more and GCC keeps the vectors on
// the stack, which cost the AVX2 kernels two thirds of their speed before.
template <typename V, typename T, int NV, int MR>
__attribute__((always_inline)) inline void tile(int64_t K, const T* A, int64_t lda, const T* B, const T* bias,
                                                T* C, int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(T);
  static_assert(kPanel % (NV * W) == 0, "a tile spans a whole stripe of one panel");
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    V b{};
    if (bias) std::memcpy(&b, bias + v * W, sizeof(V));
    for (int r = 0; r < MR; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    // 16 panel rows (4 KB) ahead: at decoding sizes W streams from L3/DRAM, and the hardware
    // prefetcher alone leaves the FMAs waiting (19 x 256 -> 1024, cold W: 130 -> 105 us)
    for (int off = 0; off < NV * W; off += 64 / int(sizeof(T))) __builtin_prefetch(B + (k + 16) * kPanel + off);
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], B + k * kPanel + v * W, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const V a = A[r * lda + k] - V{};  // one broadcast (x - 0 == x exactly)
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(C + r * ldc + v * W, &acc[r][v], sizeof(V));
}

// ---- packed_swiglu: silu(x Wg^T) * (x Wu^T) with the gate and up panels of a column block
// side by side ([NP, 2, K, 32]), both accumulated in registers and multiplied there: the two
// GEMMs, the silu and the product in one pass, and no [rows, hidden] intermediates. A tile
// takes the same stripe of the gate and the up panel.

template <typename V, typename T>
__attribute__((always_inline)) inline V silu_times(V g, V u) {
  if constexpr (std::is_same_v<T, float>) {
    return g / (vsplat<V>(1.0f) + vexp<V>(-g)) * u;
  } else {  // fp64 (gradcheck): lane by lane
    constexpr int W = sizeof(V) / sizeof(T);
    for (int i = 0; i < W; ++i) g[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
    return g;
  }
}

template <typename V, typename T, int NV, int MR>
__attribute__((always_inline)) inline void swiglu_tile(int64_t K, const T* A, int64_t lda, const T* Bg, T* C,
                                                       int64_t ldc) {
  constexpr int W = sizeof(V) / sizeof(T);
  static_assert(kPanel % (NV * W) == 0, "a tile spans a whole stripe of one panel");
  const T* Bu = Bg + K * kPanel;
  V g[MR][NV], u[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) g[r][v] = u[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    for (int off = 0; off < NV * W; off += 64 / int(sizeof(T))) {
      __builtin_prefetch(Bg + (k + 16) * kPanel + off);
      __builtin_prefetch(Bu + (k + 16) * kPanel + off);
    }
    V wg[NV], wu[NV];
    for (int v = 0; v < NV; ++v) {
      std::memcpy(&wg[v], Bg + k * kPanel + v * W, sizeof(V));
      std::memcpy(&wu[v], Bu + k * kPanel + v * W, sizeof(V));
    }
    for (int r = 0; r < MR; ++r) {
      const V a = A[r * lda + k] - V{};
      for (int v = 0; v < NV; ++v) {
        g[r][v] += a * wg[v];
        u[r][v] += a * wu[v];
      }
    }
  }
  // The products leave the registers before the silu: GCC otherwise allocates the loop's registers
  // with the silu's constants and temporaries in view, and at 4-5 rows kept the up accumulators on
  // the stack inside the K loop (2.5x slower than at 6 rows).
  alignas(64) T gu[2][MR][NV * W];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      std::memcpy(&gu[0][r][v * W], &g[r][v], sizeof(V));
      std::memcpy(&gu[1][r][v * W], &u[r][v], sizeof(V));
    }
  asm volatile("" : : "r"(gu) : "memory");
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      V gv, uv;
      std::memcpy(&gv, &gu[0][r][v * W], sizeof(V));
      std::memcpy(&uv, &gu[1][r][v * W], sizeof(V));
      const V o = silu_times<V, T>(gv, uv);
      std::memcpy(C + r * ldc + v * W, &o, sizeof(V));
    }
}

// One tile of `rows` (1..R) rows, the linear's or the SwiGLU's, instantiated for exactly that height.
template <bool Gated, typename V, typename T, int NV, int R>
__attribute__((always_inline)) inline void tail_tile(int64_t rows, int64_t K, const T* A, int64_t lda, const T* B,
                                                     const T* bias, T* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows != R) return tail_tile<Gated, V, T, NV, R - 1>(rows, K, A, lda, B, bias, C, ldc);
    if constexpr (Gated)
      swiglu_tile<V, T, NV, R>(K, A, lda, B, C, ldc);
    else
      tile<V, T, NV, R>(K, A, lda, B, bias, C, ldc);
  }
}

// Panels [p0, p1) for all M rows: a linear's (panel p at Wp + p K 32, with bias) or a SwiGLU's
// (gate and up panels side by side at Wp + 2 p K 32), in stripes of NV vectors and blocks of at
// most MR rows, the blocks balanced (19 rows at MR = 6: 5, 5, 5, 4, not 6, 6, 6, 1, whose
// single-row tile has too few accumulators to hide the FMA latency). A full panel runs stripe by
// stripe, every row block over a stripe while it is in L1; a partial last panel (N % 32) runs
// block by block through a scratch tile, its bias zero-padded, so nothing is read or written
// past row ends.
// Output column n of row i goes to C[i ldc + n - col0] (the output, or a split_run helper's scratch).
template <bool Gated, typename V, typename T, int NV, int MR>
__attribute__((always_inline)) inline void panels(int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K,
                                                  const T* A, const T* Wp, const T* bias, T* C, int64_t ldc,
                                                  int64_t col0) {
  constexpr int64_t kStripe = NV * sizeof(V) / sizeof(T);
  alignas(64) T scratch[MR * kPanel];
  alignas(64) T bias_pad[kPanel];
  const int64_t blocks = (M + MR - 1) / MR, base = M / blocks, taller = M % blocks;  // `taller` blocks of base + 1
  auto block_rows = [&](int64_t blk, int64_t& i0) {
    i0 = blk * base + std::min(blk, taller);
    return base + (blk < taller);
  };
  for (int64_t p = p0; p < p1; ++p) {
    const T* B = Wp + p * (Gated ? 2 : 1) * K * kPanel;
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
    const T* b = bias ? bias + n0 : nullptr;
    if (cols == kPanel) {
      for (int64_t s = 0; s < kPanel; s += kStripe)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          int64_t i;
          const int64_t rows = block_rows(blk, i);
          tail_tile<Gated, V, T, NV, MR>(rows, K, A + i * K, K, B + s, b ? b + s : nullptr,
                                         C + i * ldc + n0 - col0 + s, ldc);
        }
      continue;
    }
    if (bias) {
      std::fill(bias_pad, bias_pad + kPanel, T(0));
      std::copy(bias + n0, bias + n0 + cols, bias_pad);
      b = bias_pad;
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t i;
      const int64_t rows = block_rows(blk, i);
      for (int64_t s = 0; s < cols; s += kStripe)
        tail_tile<Gated, V, T, NV, MR>(rows, K, A + i * K, K, B + s, b ? b + s : nullptr, scratch + s, kPanel);
      for (int64_t r = 0; r < rows; ++r)
        std::copy(scratch + r * kPanel, scratch + r * kPanel + cols, C + (i + r) * ldc + n0 - col0);
    }
  }
}

// AVX-512: the linear's 12 rows x 2 zmm (fp32) keep 24 of the 32 registers accumulating, fp64
// 6 x 4; the SwiGLU's 6 rows x (2 gate + 2 up) zmm, fp64 3 x (4 + 4).
LEANFORMER_AVX512 void panels_avx512(bool gated, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K,
                                     const float* A, const float* Wp, const float* bias, float* C, int64_t ldc,
                                     int64_t col0) {
  if (gated)
    panels<true, v16f, float, 2, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
  else
    panels<false, v16f, float, 2, 12>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
}
LEANFORMER_AVX512 void panels_avx512(bool gated, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K,
                                     const double* A, const double* Wp, const double* bias, double* C, int64_t ldc,
                                     int64_t col0) {
  if (gated)
    panels<true, v8d, double, 4, 3>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
  else
    panels<false, v8d, double, 4, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
}
// AVX2 (16 registers): the linear's 6 rows x 2 ymm (16 columns, half a panel), 12 accumulators
// + 2 panel vectors + the broadcast, as small_gemm's tile; the SwiGLU's 6 rows x (1 gate + 1 up)
// ymm. fp64 (gradcheck) alike, on half the columns.
LEANFORMER_CLONES void panels_avx2(bool gated, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K,
                                   const float* A, const float* Wp, const float* bias, float* C, int64_t ldc,
                                   int64_t col0) {
  if (gated)
    panels<true, v8f, float, 1, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
  else
    panels<false, v8f, float, 2, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
}
LEANFORMER_CLONES void panels_avx2(bool gated, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K,
                                   const double* A, const double* Wp, const double* bias, double* C, int64_t ldc,
                                   int64_t col0) {
  if (gated)
    panels<true, v4d, double, 1, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
  else
    panels<false, v4d, double, 2, 6>(p0, p1, M, N, K, A, Wp, bias, C, ldc, col0);
}

// y [..., N] from x [..., K] over the packed panels. float32: in chunks of panels on the calling
// thread and split_run's spinning helpers (split_pool.h), which a busy host cannot stall, so
// that a decoding step's GEMVs (M = 1, the weights streamed from memory) use every core. float64
// (gradcheck): split over threads by panel where the work is worth a parallel region (grain.h).
at::Tensor run_panels(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t N,
                      bool gated) {
  const int64_t K = x.size(-1), NP = packed.size(0);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (rows == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous(), wc = packed.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const bool avx512 = cpu_has_avx512();
  if (x.scalar_type() == at::kFloat) {
    const float* A = xc.data_ptr<float>();
    const float* Wp = wc.data_ptr<float>();
    const float* b = bc.has_value() ? bc->data_ptr<float>() : nullptr;
    const int64_t per_chunk = split_units_per_chunk(NP);
    // By value: a helper may still run a chunk the caller took back after this call returned.
    split_run(make_split_job(rows, N, per_chunk, kPanel, y.data_ptr<float>(),
                             [keep = storages_of(xc, wc, bc.has_value() ? *bc : at::Tensor()), A, Wp, b, avx512,
                              gated, per_chunk, NP, rows, N, K](int64_t c, float* dst,
                                                                                             int64_t ld, bool) {
      const int64_t p0 = c * per_chunk, p1 = std::min(NP, p0 + per_chunk);
      if (avx512)
        panels_avx512(gated, p0, p1, rows, N, K, A, Wp, b, dst, ld, p0 * kPanel);
      else
        panels_avx2(gated, p0, p1, rows, N, K, A, Wp, b, dst, ld, p0 * kPanel);
    }));
    return y;
  }
  const double panel_macs = double(gated ? 2 : 1) * rows * K * kPanel;
  const int64_t grain = parallel_grain(work_ns(panel_macs, panel_macs / rows * x.element_size()));
  // float64 (the checks allow float32 and float64 only)
  const double* A = xc.data_ptr<double>();
  const double* Wp = wc.data_ptr<double>();
  const double* b = bc.has_value() ? bc->data_ptr<double>() : nullptr;
  double* C = y.data_ptr<double>();
  parallel_for(0, NP, grain, [&](int64_t p0, int64_t p1) {
    if (avx512)
      panels_avx512(gated, p0, p1, rows, N, K, A, Wp, b, C, N, 0);
    else
      panels_avx2(gated, p0, p1, rows, N, K, A, Wp, b, C, N, 0);
  });
  return y;
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed_weight,
                             const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_packed_linear_inputs(x, packed_weight, bias, out_features);
  return run_panels(x, packed_weight, bias, out_features, /*gated=*/false);
}

at::Tensor packed_swiglu_cpu(const at::Tensor& x, const at::Tensor& packed_gate_up, int64_t hidden) {
  check_packed_swiglu_inputs(x, packed_gate_up, hidden);
  return run_panels(x, packed_gate_up, std::nullopt, hidden, /*gated=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("packed_swiglu", &packed_swiglu_cpu);
}

}  // namespace leanformer
