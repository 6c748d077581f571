// Vector loads shared by the CPU kernels: fp32 lanes from fp32/bf16/fp16 storage and fp64
// lanes from fp64, as the GCC/Clang vectors of small_gemm.h (AVX2 in the x86-64-v3 clone).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "small_gemm.h"

namespace leanformer {

// Sums accumulate in fp32, or fp64 for fp64 inputs.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t> struct VecOf;
template <> struct VecOf<float> { using type = v8f; static constexpr int width = 8; };
template <> struct VecOf<double> { using type = v4d; static constexpr int width = 4; };

template <typename acc_t>
using vec_t = typename VecOf<acc_t>::type;

// width elements of p, converted to acc_t lanes. Always inlined into the cloned kernels, so
// the vector-return ABI note of the default clone does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
__attribute__((always_inline)) inline v8f vload(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline v4d vload(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline v8f vload(const c10::BFloat16* p) {
  typedef uint16_t v8u16 __attribute__((vector_size(16)));
  typedef uint32_t v8u32 __attribute__((vector_size(32)));
  v8u16 b;
  std::memcpy(&b, p, sizeof(b));
  const v8u32 w = __builtin_convertvector(b, v8u32) << 16;  // bf16 is fp32's top half
  v8f v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline v8f vload(const c10::Half* p) {
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return vload(f);
}

}  // namespace leanformer
