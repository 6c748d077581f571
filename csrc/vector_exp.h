// exp over 8 floats at once for softmax kernels: std::exp is a scalar libm call, and at tree
// attention sizes (64 queries x 2k keys x 8 heads per step) it alone would cost more than
// both GEMMs. Include it only in translation units whose callers carry LEANFORMER_CLONES, so
// it is compiled for AVX2 there.
#pragma once

#include <cstring>

#include "small_gemm.h"

namespace leanformer {

typedef int v8i __attribute__((vector_size(32)));

// Always inlined, so the vectors never cross a call (whose ABI differs between the clones);
// hence GCC's note that returning a 256-bit vector without AVX changes the ABI does not apply.
// GCC also flags every call site, so the note stays off for the including file too.
#pragma GCC diagnostic ignored "-Wpsabi"

__attribute__((always_inline)) inline v8f v8f_load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void v8f_store(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline v8f v8f_splat(float x) { return v8f{} + x; }

__attribute__((always_inline)) inline v8f v8f_max(v8f a, v8f b) { return a > b ? a : b; }

// Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r, times 2^n built in
// the exponent bits; about 1 ulp. Inputs below -87.3 (including -inf, the masked scores)
// give exactly 0; inputs above 88 are clamped.
__attribute__((always_inline)) inline v8f v8f_exp(v8f x) {
  const v8i keep = x >= v8f_splat(-87.3f);
  x = v8f_max(x, v8f_splat(-87.3f));
  x = x < v8f_splat(88.0f) ? x : v8f_splat(88.0f);
  // Round to nearest through the 1.5 * 2^23 trick (no libm call; exact without -ffast-math).
  const v8f magic = v8f_splat(12582912.0f);
  const v8f n = (x * v8f_splat(1.44269504088896341f) + magic) - magic;
  const v8f r = x - n * v8f_splat(0.693359375f) + n * v8f_splat(2.12194440e-4f);
  v8f y = v8f_splat(1.9875691500e-4f);
  y = y * r + v8f_splat(1.3981999507e-3f);
  y = y * r + v8f_splat(8.3334519073e-3f);
  y = y * r + v8f_splat(4.1665795894e-2f);
  y = y * r + v8f_splat(1.6666665459e-1f);
  y = y * r + v8f_splat(5.0000001201e-1f);
  y = y * (r * r) + r + v8f_splat(1.0f);
  const v8i pow2n = (__builtin_convertvector(n, v8i) + 127) << 23;
  y *= (v8f)pow2n;  // a vector cast reinterprets the bits
  return (v8f)((v8i)y & keep);
}

}  // namespace leanformer
