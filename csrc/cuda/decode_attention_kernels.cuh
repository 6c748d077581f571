// The kernel of decode_attention, torch-free; the launcher is in decode_attention_cuda.cu.
// Compiled by nvcc for the GPU and, in the emulation build, for the CPU (device.cuh).
//
// Block (h, b): query head h of sequence b, kDecodeWarps warps. The block rotates its query and
// its KV head's new key (fp32 RoPE, rounded to the input dtype) into shared memory; the first
// query head of each KV head writes the new key and value to the cache at row lens[b]. Warp w
// takes the slots w, w + kDecodeWarps, ... with its own online softmax (m, l and an fp32 output
// row in shared memory, lane-owned elements); slot lens[b] is read from shared memory, never
// from the cache another block writes, so no block waits on another. The warps' partial results
// are merged at the end (log-sum-exp).
#pragma once

#include "device.cuh"

#include <cstdint>
#include <limits>

namespace leanformer {
namespace {

constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int64_t kDecodeMaxGridY = 65535;

// Shared memory of one block, in floats: q, the new k and v [D] each, the warps' outputs
// [kDecodeWarps, D] and their (m, l).
inline int64_t decode_attention_smem_floats(int64_t D) { return (3 + kDecodeWarps) * D + 2 * kDecodeWarps; }

template <typename scalar_t>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(const scalar_t* __restrict__ qkv, int64_t qkv_stride, scalar_t* __restrict__ k_cache,
                            scalar_t* __restrict__ v_cache, const int64_t* __restrict__ lens,
                            const float* __restrict__ cos, const float* __restrict__ sin,
                            scalar_t* __restrict__ out, int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t P,
                            float scale) {
  LF_DYNAMIC_SHARED(float, smem);
  const int64_t h = blockIdx.x, b = blockIdx.y, G = H / Hkv, g = h / G, half = D / 2;
  const int64_t pos = lens[b];
  CUDA_KERNEL_ASSERT(pos >= 0 && pos < L && "decode_attention: lens[b] must be in [0, L - 1]");
  CUDA_KERNEL_ASSERT(pos < P && "decode_attention: lens[b] must be below cos.shape[0]");
  float* q = smem;
  float* k_new = q + D;
  float* v_new = k_new + D;
  float* acc = v_new + D;  // [kDecodeWarps, D]
  float* ml = acc + kDecodeWarps * D;  // m [kDecodeWarps], l [kDecodeWarps]
  const scalar_t* row = qkv + b * qkv_stride;
  const float* c = cos + pos * D;
  const float* s = sin + pos * D;
  const bool writer = h % G == 0;
  const int64_t slot = ((b * L + pos) * Hkv + g) * D;
  for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
    const int64_t e = d < half ? d + half : d - half;
    const float qr = static_cast<float>(row[h * D + d]) * c[d] + static_cast<float>(row[h * D + e]) * s[d];
    q[d] = static_cast<float>(static_cast<scalar_t>(qr)) * scale;
    const scalar_t* kx = row + (H + g) * D;
    const scalar_t kr = static_cast<scalar_t>(static_cast<float>(kx[d]) * c[d] + static_cast<float>(kx[e]) * s[d]);
    const scalar_t vr = row[(H + Hkv + g) * D + d];
    k_new[d] = static_cast<float>(kr);
    v_new[d] = static_cast<float>(vr);
    if (writer) {
      k_cache[slot + d] = kr;
      v_cache[slot + d] = vr;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* a = acc + warp * D;
  for (int64_t d = lane; d < D; d += 32) a[d] = 0.0f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf, l = 0.0f;
  const int64_t head_off = (b * L * Hkv + g) * D, row_stride = Hkv * D;
  for (int64_t t = warp; t <= pos; t += kDecodeWarps) {  // uniform per warp: every lane shuffles
    const bool is_new = t == pos;
    const scalar_t* kt = k_cache + head_off + t * row_stride;
    float dot = 0.0f;
    for (int64_t d = lane; d < D; d += 32) dot += q[d] * (is_new ? k_new[d] : static_cast<float>(kt[d]));
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    const float m_new = fmaxf(m, dot);
    const float corr = expf(m - m_new);  // 0 for the first slot (m = -inf)
    const float p = expf(dot - m_new);
    l = l * corr + p;
    const scalar_t* vt = v_cache + head_off + t * row_stride;
    for (int64_t d = lane; d < D; d += 32) a[d] = a[d] * corr + p * (is_new ? v_new[d] : static_cast<float>(vt[d]));
    m = m_new;
  }
  if (lane == 0) {
    ml[warp] = m;
    ml[kDecodeWarps + warp] = l;
  }
  __syncthreads();
  float M = neg_inf;
  for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, ml[w]);  // finite: warp 0 saw slot 0
  float denom = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w) denom += ml[kDecodeWarps + w] * expf(ml[w] - M);  // idle warps: 0
  const float inv = 1.0f / denom;
  scalar_t* o = out + (b * H + h) * D;
  for (int64_t d = threadIdx.x; d < D; d += kDecodeThreads) {
    float x = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) x += acc[w * D + d] * expf(ml[w] - M);
    o[d] = static_cast<scalar_t>(x * inv);
  }
}

}  // namespace
}  // namespace leanformer
