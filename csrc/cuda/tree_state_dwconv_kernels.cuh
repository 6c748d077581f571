// The kernel of tree_dwconv, torch-free; the launcher is in tree_state_dwconv_cuda.cu.
// Compiled by nvcc for the GPU and, in the emulation build, for the CPU (device.cuh).
#pragma once

#include "device.cuh"

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tree_dwconv_kernel(const T* __restrict__ v, int64_t vs0, int64_t vs1, int64_t vs2, int64_t vs3,
                       const T* __restrict__ tail, int64_t ts0, int64_t ts1, int64_t ts2,
                       const int64_t* __restrict__ parents, int64_t parents_stride, const T* __restrict__ w,
                       const T* __restrict__ bias, T* __restrict__ out, int64_t B, int64_t Tn, int64_t H, int64_t D,
                       int64_t K) {
  using acc_t = opmath_t<T>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * Tn * H * D) return;
  const int64_t d = i % D, h = i / D % H, t = i / (D * H) % Tn, b = i / (D * H * Tn);
  const int64_t* par = parents + b * parents_stride;
  const int64_t W = K - 1;
  acc_t acc = bias ? static_cast<acc_t>(bias[d]) : acc_t(0);
  int64_t cur = t;
  for (int64_t l = 0; l < K; ++l) {
    const T x = cur >= 0 ? v[b * vs0 + cur * vs1 + h * vs2 + d * vs3]
                         : tail[(b * H + h) * ts0 + d * ts1 + (W + cur) * ts2];
    acc += static_cast<acc_t>(w[d * K + K - 1 - l]) * static_cast<acc_t>(x);
    if (cur >= 0) {
      const int64_t up = par[cur];
      CUDA_KERNEL_ASSERT(up >= -1 && up < cur && "tree_dwconv: parents[i] must be in [-1, i)");
      cur = up;
    } else {
      cur -= 1;
    }
  }
  out[i] = static_cast<T>(acc);
}

}  // namespace
}  // namespace leanformer
