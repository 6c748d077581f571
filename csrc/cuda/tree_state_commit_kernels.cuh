// The kernel of sla_tree_commit, torch-free; the launcher is in tree_state_commit_cuda.cu.
// Compiled by nvcc for the GPU and, in the emulation build, for the CPU (device.cuh).
#pragma once

#include "device.cuh"

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

template <typename state_t, typename kv_t, typename tail_t>
__global__ void __launch_bounds__(kThreads)
    sla_tree_commit_kernel(state_t* __restrict__ S, Strides4 ss, state_t* __restrict__ z, int64_t zs0, int64_t zs1,
                           int64_t zs2, const kv_t* __restrict__ k, Strides4 ks, const kv_t* __restrict__ v,
                           Strides4 vs, tail_t* __restrict__ tail, int64_t ts0, int64_t ts1, int64_t ts2, int64_t W,
                           const int64_t* __restrict__ path, int64_t n_max, const int64_t* __restrict__ num_accepted,
                           int64_t H, int64_t Dk, int64_t Dv, int64_t T) {
  LF_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t b = blockIdx.x / H, h = blockIdx.x % H;
  const int64_t n = num_accepted[b];
  CUDA_KERNEL_ASSERT(n >= 0 && n <= n_max && "num_accepted must be in [0, path.shape[1]]");
  const int64_t* pb = path + b * n_max;
  for (int64_t i = threadIdx.x; i < Dk * Dv; i += kThreads) {
    const int64_t d = i / Dv, e = i % Dv;
    state_t acc = S[b * ss.s0 + h * ss.s1 + d * ss.s2 + e];
    state_t zacc = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t node = pb[j];
      CUDA_KERNEL_ASSERT(node >= 0 && node < T && "path must hold tree nodes");
      const state_t kd = static_cast<state_t>(k[b * ks.s0 + node * ks.s1 + h * ks.s2 + d * ks.s3]);
      if (kd > 0) {
        acc += kd * static_cast<state_t>(v[b * vs.s0 + node * vs.s1 + h * vs.s2 + e * vs.s3]);
        zacc += kd;
      }
    }
    S[b * ss.s0 + h * ss.s1 + d * ss.s2 + e] = acc;
    if (e == 0) z[b * zs0 + h * zs1 + d * zs2] += zacc;
  }
  if (tail == nullptr || W == 0) return;
  tail_t* old = reinterpret_cast<tail_t*>(smem);  // [Dv, W]
  tail_t* t = tail + (b * H + h) * ts0;
  for (int64_t i = threadIdx.x; i < Dv * W; i += kThreads) old[i] = t[(i / W) * ts1 + (i % W) * ts2];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < Dv * W; i += kThreads) {
    const int64_t e = i / W, r = i % W, p = n + r;  // the last W of "old tail ++ V[path]"
    t[e * ts1 + r * ts2] = p < W ? old[e * W + p]
                                 : static_cast<tail_t>(v[b * vs.s0 + pb[p - W] * vs.s1 + h * vs.s2 + e * vs.s3]);
  }
}

}  // namespace
}  // namespace leanformer
