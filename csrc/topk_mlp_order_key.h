// The total order of the top-k selection, shared by the CPU kernels and the CUDA kernels
// (torch-free: csrc/cuda/topk_mlp_kernels.cuh includes it).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace leanformer {

// k largest-first ranking key of an activation value, as an unsigned integer whose order is
// the value's order: NaN ranks above +inf (as in torch.sort / torch.topk) and -0 equals +0.
// Ties are then broken by the lowest index, so every element has a distinct rank.
C10_HOST_DEVICE inline uint32_t order_key(float v) {
  if (v != v) return 0xFFFFFFFFu;
  v += 0.0f;  // -0 -> +0
#ifdef __CUDA_ARCH__
  const uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

C10_HOST_DEVICE inline uint64_t order_key(double v) {
  if (v != v) return ~uint64_t(0);
  v += 0.0;
#ifdef __CUDA_ARCH__
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
}

}  // namespace leanformer
