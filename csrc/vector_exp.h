// exp over a vector of floats at once for softmax kernels: std::exp is a scalar libm call, and at
// tree attention sizes (64 queries x 2k keys x 8 heads per step) it alone would cost more than
// both GEMMs. Written over GCC vector types of any width (8 floats: AVX2, 16: AVX-512); include
// it only in translation units whose callers carry LEANFORMER_CLONES or an explicit target, so it
// is compiled for those instruction sets there.
#pragma once

#include <cstring>

#include "small_gemm.h"

namespace leanformer {

// Always inlined, so the vectors never cross a call (whose ABI differs between the clones);
// hence GCC's note that returning a 256-bit vector without AVX changes the ABI does not apply.
// GCC also flags every call site, so the note stays off for the including file too.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename V>
__attribute__((always_inline)) inline V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

template <typename V>
__attribute__((always_inline)) inline V vsplat(float x) { return V{} + x; }

template <typename V>
__attribute__((always_inline)) inline V vmax(V a, V b) { return a > b ? a : b; }

// Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r, times 2^n built in
// the exponent bits; about 1 ulp. Inputs below -87.3 (including -inf, the masked scores)
// give exactly 0; inputs above 88 are clamped.
template <typename V>
__attribute__((always_inline)) inline V vexp(V x) {
  typedef int VI __attribute__((vector_size(sizeof(V))));
  const VI keep = x >= vsplat<V>(-87.3f);
  x = vmax(x, vsplat<V>(-87.3f));
  x = x < vsplat<V>(88.0f) ? x : vsplat<V>(88.0f);
  // Round to nearest through the 1.5 * 2^23 trick (no libm call; exact without -ffast-math).
  const V magic = vsplat<V>(12582912.0f);
  const V n = (x * vsplat<V>(1.44269504088896341f) + magic) - magic;
  const V r = x - n * vsplat<V>(0.693359375f) + n * vsplat<V>(2.12194440e-4f);
  V y = vsplat<V>(1.9875691500e-4f);
  y = y * r + vsplat<V>(1.3981999507e-3f);
  y = y * r + vsplat<V>(8.3334519073e-3f);
  y = y * r + vsplat<V>(4.1665795894e-2f);
  y = y * r + vsplat<V>(1.6666665459e-1f);
  y = y * r + vsplat<V>(5.0000001201e-1f);
  y = y * (r * r) + r + vsplat<V>(1.0f);
  const VI pow2n = (__builtin_convertvector(n, VI) + 127) << 23;
  y *= (V)pow2n;  // a vector cast reinterprets the bits
  return (V)((VI)y & keep);
}

}  // namespace leanformer
