// exp over a vector of floats at once for softmax kernels: std::exp is a scalar libm call, and at
// tree attention sizes (64 queries x 2k keys x 8 heads per step) it alone would cost more than
// both GEMMs. Written over GCC vector types of any width (8 floats: AVX2, 16: AVX-512); include
// it only in translation units whose callers carry LEANFORMER_CLONES or an explicit target, so it
// is compiled for those instruction sets there.
#pragma once

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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
namespace expf_coeff {
constexpr float kMin = -87.3f, kMax = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = 2.12194440e-4f;  // ln 2 = kLn2Hi - kLn2Lo
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace expf_coeff

template <typename V>
__attribute__((always_inline)) inline V vexp(V x) {
  using namespace expf_coeff;
  typedef int VI __attribute__((vector_size(sizeof(V))));
  const VI keep = x >= vsplat<V>(kMin);
  x = vmax(x, vsplat<V>(kMin));
  x = x < vsplat<V>(kMax) ? x : vsplat<V>(kMax);
  // Round to nearest through the 1.5 * 2^23 trick (no libm call; exact without -ffast-math).
  const V magic = vsplat<V>(12582912.0f);
  const V n = (x * vsplat<V>(kLog2e) + magic) - magic;
  const V r = x - n * vsplat<V>(kLn2Hi) + n * vsplat<V>(kLn2Lo);
  V y = vsplat<V>(kP[0]);
  for (int i = 1; i < 6; ++i) y = y * r + vsplat<V>(kP[i]);
  y = y * (r * r) + r + vsplat<V>(1.0f);
  const VI pow2n = (__builtin_convertvector(n, VI) + 127) << 23;
  y *= (V)pow2n;  // a vector cast reinterprets the bits
  return (V)((VI)y & keep);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// vexp for one zmm register, for AVX-512 code written with intrinsics: the same reduction and
// polynomial, with vroundscaleps for the rounding and vscalefps for the 2^n in place of the
// clamps and integer tricks (about 15 instructions instead of 22). Inputs below kMin (-inf:
// masked scores) give exactly 0. GCC will not inline these target-specific intrinsics into
// a generic template, so callers are AVX-512 functions of their own.
LEANFORMER_AVX512 __attribute__((always_inline)) inline __m512 vexp512(__m512 x) {
  using namespace expf_coeff;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMin), _CMP_GE_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(kMax));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}
#endif

}  // namespace leanformer
