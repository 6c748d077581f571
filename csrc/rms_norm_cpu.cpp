// rms_norm on the CPU: y = x / sqrt(mean(x^2) + eps) * weight over the last dim, one row at a
// time. Decoding a Llama calls it twice per layer (and once at the end) on one row of d_model
// values, where F.rms_norm's few aten ops cost more than the arithmetic: this is one call.
//
// The summation order is fixed so that every path (AVX-512, AVX2, portable) gives the same bits
// and a row's result does not depend on the other rows: 16 lane accumulators, lane j the fma
// chain of x[i]^2 for i = j (mod 16) in increasing i (past C: zeros), then the tree
// (v[j] + v[j+8]), (+4), (+2), (+1) on the 16 stored lanes. Then r = 1 / sqrt(s / C + eps) and
// y = (x * r) * w, each product rounded in fp32, the result once to x's dtype. fp32 math for the
// 16-bit dtypes (converted first), fp64 for fp64 (a scalar loop in the same order).
// No CUDA kernel: CUDA users keep F.rms_norm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LEANFORMER_RMS_X86 1
#define LEANFORMER_RMS_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define LEANFORMER_RMS_AVX2 __attribute__((target("avx2,fma")))
#endif

#include "grain.h"
#include "rms_norm_checks.h"
#include "small_gemm.h"

namespace leanformer {
namespace {

constexpr int kLanes = 16;

// The fixed tree over the 16 lane sums.
template <typename acc_t>
acc_t reduce_lanes(const acc_t* v) {
  acc_t s8[8], s4[4], s2[2];
  for (int j = 0; j < 8; ++j) s8[j] = v[j] + v[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  for (int j = 0; j < 2; ++j) s2[j] = s4[j] + s4[j + 2];
  return s2[0] + s2[1];
}

template <typename acc_t>
acc_t inv_rms(acc_t sumsq, int64_t C, acc_t eps) {
  return acc_t(1) / std::sqrt(sumsq / acc_t(C) + eps);
}

// ---- portable: the same operations one element at a time (also fp64) ----

template <typename acc_t>
acc_t sumsq_portable(const acc_t* x, int64_t C) {
  acc_t lanes[kLanes] = {};
  for (int64_t i = 0; i < C; ++i) lanes[i % kLanes] = std::fma(x[i], x[i], lanes[i % kLanes]);
  return reduce_lanes(lanes);
}

template <typename acc_t>
void scale_portable(const acc_t* x, const acc_t* w, acc_t r, int64_t C, acc_t* y) {
  for (int64_t i = 0; i < C; ++i) y[i] = (x[i] * r) * w[i];
}

#ifdef LEANFORMER_RMS_X86

// ---- AVX-512: the 16 lanes are one zmm ----

LEANFORMER_RMS_AVX512 float sumsq_avx512(const float* x, int64_t C) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (i < C) {
    const __m512 v = _mm512_maskz_loadu_ps(__mmask16((1u << (C - i)) - 1), x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, acc);
  return reduce_lanes(lanes);
}

LEANFORMER_RMS_AVX512 void scale_avx512(const float* x, const float* w, float r, int64_t C, float* y) {
  const __m512 rv = _mm512_set1_ps(r);
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), rv), _mm512_loadu_ps(w + i)));
  if (i < C) {
    const __mmask16 m = __mmask16((1u << (C - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), rv),
                                                  _mm512_maskz_loadu_ps(m, w + i)));
  }
}

// ---- AVX2: lanes 0-7 and 8-15 in two ymm ----

LEANFORMER_RMS_AVX2 float sumsq_avx2(const float* x, int64_t C) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    lo = _mm256_fmadd_ps(a, a, lo);
    hi = _mm256_fmadd_ps(b, b, hi);
  }
  if (i < C) {
    alignas(32) float tail[kLanes] = {};
    std::memcpy(tail, x + i, (C - i) * sizeof(float));
    const __m256 a = _mm256_load_ps(tail), b = _mm256_load_ps(tail + 8);
    lo = _mm256_fmadd_ps(a, a, lo);
    hi = _mm256_fmadd_ps(b, b, hi);
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  return reduce_lanes(lanes);
}

LEANFORMER_RMS_AVX2 void scale_avx2(const float* x, const float* w, float r, int64_t C, float* y) {
  const __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= C; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  for (; i < C; ++i) y[i] = (x[i] * r) * w[i];
}

#endif  // LEANFORMER_RMS_X86

enum class Path { kAvx512, kAvx2, kPortable };

// Picked once: LEANFORMER_DISABLE_AVX512=1 takes the AVX2 path on an AVX-512 CPU (through
// cpu_has_avx512), LEANFORMER_DISABLE_AVX2=1 the portable loops (tests compare the three).
Path cpu_path() {
#ifdef LEANFORMER_RMS_X86
  static const Path path = std::getenv("LEANFORMER_DISABLE_AVX2")                                 ? Path::kPortable
                           : cpu_has_avx512()                                                     ? Path::kAvx512
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Path::kAvx2
                                                                                                 : Path::kPortable;
  return path;
#else
  return Path::kPortable;
#endif
}

// One fp32 row: y = (x * r) * w.
inline void rms_row(Path path, const float* x, const float* w, float eps, int64_t C, float* y) {
#ifdef LEANFORMER_RMS_X86
  if (path == Path::kAvx512) {
    scale_avx512(x, w, inv_rms(sumsq_avx512(x, C), C, eps), C, y);
    return;
  }
  if (path == Path::kAvx2) {
    scale_avx2(x, w, inv_rms(sumsq_avx2(x, C), C, eps), C, y);
    return;
  }
#endif
  scale_portable(x, w, inv_rms(sumsq_portable(x, C), C, eps), C, y);
}

// fp32 rows; float16 / bfloat16 ones through fp32 row buffers, each output rounded once.
template <typename scalar_t>
void rms_rows_fp32(const scalar_t* x, const float* w, float eps, int64_t rows, int64_t C, scalar_t* y) {
  const Path path = cpu_path();
  const double row_ns = work_ns(2.0 * C, 2.0 * C * sizeof(scalar_t) + C * sizeof(float), 0);
  parallel_for(0, rows, parallel_grain(row_ns), [&](int64_t r0, int64_t r1) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t r = r0; r < r1; ++r) rms_row(path, x + r * C, w, eps, C, y + r * C);
    } else {
      std::vector<float> xb(C), yb(C);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * C;
        for (int64_t i = 0; i < C; ++i) xb[i] = static_cast<float>(xr[i]);
        rms_row(path, xb.data(), w, eps, C, yb.data());
        scalar_t* yr = y + r * C;
        for (int64_t i = 0; i < C; ++i) yr[i] = static_cast<scalar_t>(yb[i]);
      }
    }
  });
}

void rms_rows_fp64(const double* x, const double* w, double eps, int64_t rows, int64_t C, double* y) {
  const double row_ns = work_ns(2.0 * C, 3.0 * C * sizeof(double), 0);
  parallel_for(0, rows, parallel_grain(row_ns), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* xr = x + r * C;
      scale_portable(xr, w, inv_rms(sumsq_portable(xr, C), C, eps), C, y + r * C);
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight, eps);
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(-1);
  if (y.numel() == 0) return y;
  const int64_t rows = y.numel() / C;
  const at::Tensor xc = x.contiguous();
  const auto dtype = x.scalar_type();
  if (dtype == at::kDouble) {
    const at::Tensor wc = weight.to(at::kDouble).contiguous();
    rms_rows_fp64(xc.data_ptr<double>(), wc.data_ptr<double>(), eps, rows, C, y.data_ptr<double>());
    return y;
  }
  const at::Tensor wc = weight.scalar_type() == at::kFloat ? weight.contiguous() : weight.to(at::kFloat).contiguous();
  const float* w = wc.data_ptr<float>();
  const float e = static_cast<float>(eps);
  if (dtype == at::kFloat)
    rms_rows_fp32(xc.data_ptr<float>(), w, e, rows, C, y.data_ptr<float>());
  else if (dtype == at::kHalf)
    rms_rows_fp32(xc.data_ptr<c10::Half>(), w, e, rows, C, y.data_ptr<c10::Half>());
  else
    rms_rows_fp32(xc.data_ptr<c10::BFloat16>(), w, e, rows, C, y.data_ptr<c10::BFloat16>());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace leanformer
