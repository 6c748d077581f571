// The kernels of the top-k sparse MLP ops, torch-free (pointers, sizes in); the launchers
// (the backend of topk_mlp_ops.h) are in topk_mlp_cuda.cu. Compiled by nvcc for the GPU and, in
// the emulation build, for the CPU (device.cuh).
//
#pragma once

#include "../topk_mlp_order_key.h"
#include "device.cuh"

#include <cstdint>
#include <type_traits>

namespace leanformer {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kColTile = 256;     // gather_rows / scatter_rows: columns per block
constexpr int kRowChunk = 256;    // gather_rows: (value, index) pairs staged per step
constexpr int kDotWarps = 8;      // gather_dot: pairs per block
constexpr int kMaxSplitRows = 8;  // gather_rows: split k only for this many tokens or fewer

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename scalar_t>
using key_type = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;

template <typename scalar_t, bool kRelu>
__device__ __forceinline__ scalar_t activate(scalar_t x) {
  // NaN passes through, as in F.relu. Compared in the op math type: a tiny negative double
  // must not round to -0.0f first.
  return (kRelu && static_cast<opmath_t<scalar_t>>(x) < 0) ? scalar_t(0) : x;
}

template <typename scalar_t>
__device__ __forceinline__ key_type<scalar_t> key_of(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>)
    return order_key(v);
  else
    return order_key(static_cast<float>(v));
}

template <typename scalar_t, bool kRelu>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(const scalar_t* __restrict__ h, int64_t d_ff, int64_t k,
                       scalar_t* __restrict__ values, int64_t* __restrict__ indices,
                       scalar_t* __restrict__ pre) {
  using key_t = key_type<scalar_t>;
  constexpr int kBits = 8 * sizeof(key_t);
  using Scan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ uint32_t hist[256];
  __shared__ key_t s_prefix;
  __shared__ int64_t s_remaining;

  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t row = blockIdx.x;
  const scalar_t* x = h + row * d_ff;

  // ---- radix select: the k-th largest key T, and how many keys equal to T are taken ----
  key_t prefix = 0, mask = 0;
  int64_t remaining = k;  // still to take among the keys matching prefix under mask
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kSelectThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t i = tid; i < d_ff; i += kSelectThreads) {
      const key_t key = key_of(activate<scalar_t, kRelu>(x[i]));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l holds bins 255 - 8l - t (t < 8): the warp scans the histogram from the top.
      uint32_t cnt[8], local = 0;
#pragma unroll
      for (int t = 0; t < 8; ++t) local += (cnt[t] = hist[255 - (8 * lane + t)]);
      uint32_t incl = local;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      int64_t above = incl - local;  // keys in the bins above this lane's
      if (above < remaining && remaining <= static_cast<int64_t>(incl)) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          if (above + cnt[t] >= remaining) {
            s_prefix = prefix | (static_cast<key_t>(255 - (8 * lane + t)) << shift);
            s_remaining = remaining - above;
            break;
          }
          above += cnt[t];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= static_cast<key_t>(0xFF) << shift;
  }
  const key_t T = prefix;
  const int64_t take_equal = remaining;

  // ---- output in index order: slot = greater-before + min(equal-before, take_equal) ----
  int64_t gt_total = 0, eq_total = 0;
  for (int64_t base = 0; base < d_ff && gt_total + imin(eq_total, take_equal) < k;
       base += kSelectThreads) {
    const int64_t i = base + tid;
    scalar_t a = scalar_t(0);
    bool gt = false, eq = false;
    if (i < d_ff) {
      a = activate<scalar_t, kRelu>(x[i]);
      const key_t key = key_of(a);
      gt = key > T;
      eq = key == T;
    }
    // Counts per tile are <= 256: greater in the high half, equal in the low half.
    uint32_t packed = (uint32_t(gt) << 16) | uint32_t(eq), before, tile_total;
    Scan(scan_storage).ExclusiveSum(packed, before, tile_total);
    const int64_t gt_before = gt_total + (before >> 16), eq_before = eq_total + (before & 0xFFFF);
    if (gt || (eq && eq_before < take_equal)) {
      const int64_t slot = row * k + gt_before + imin(eq_before, take_equal);
      indices[slot] = i;
      values[slot] = a;
      if (pre) pre[slot] = x[i];
    }
    gt_total += tile_total >> 16;
    eq_total += tile_total & 0xFFFF;
    __syncthreads();  // scan_storage is reused by the next tile
  }
}

// out[n, c] (or partial[split, n, c]) = sum over this split's j of v[n, j] * table[idx[n, j], c].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColTile)
    gather_rows_kernel(const acc_t* __restrict__ v, const int64_t* __restrict__ idx, int64_t N,
                       int64_t k, const scalar_t* __restrict__ table, int64_t d_ff, int64_t C,
                       int64_t col_tiles, int64_t rows_per_split, const scalar_t* __restrict__ bias,
                       acc_t* __restrict__ partial, scalar_t* __restrict__ out) {
  __shared__ acc_t sv[kRowChunk];
  __shared__ int64_t si[kRowChunk];
  const int64_t n = blockIdx.x / col_tiles, c = (blockIdx.x % col_tiles) * kColTile + threadIdx.x;
  const int64_t j0 = blockIdx.y * rows_per_split, j1 = imin(k, j0 + rows_per_split);
  acc_t acc = 0;
  for (int64_t jc = j0; jc < j1; jc += kRowChunk) {
    const int len = static_cast<int>(imin(kRowChunk, j1 - jc));
    if (threadIdx.x < len) {
      const int64_t i = idx[n * k + jc + threadIdx.x];
      CUDA_KERNEL_ASSERT(i >= 0 && i < d_ff && "indices must be in [0, d_ff)");
      si[threadIdx.x] = i;
      sv[threadIdx.x] = v[n * k + jc + threadIdx.x];
    }
    __syncthreads();
    if (c < C) {
#pragma unroll 4
      for (int jj = 0; jj < len; ++jj) acc += sv[jj] * static_cast<acc_t>(table[si[jj] * C + c]);
    }
    __syncthreads();
  }
  if (c >= C) return;
  if (partial) {
    partial[(blockIdx.y * N + n) * C + c] = acc;
  } else {
    if (bias) acc += static_cast<acc_t>(bias[c]);
    out[n * C + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void reduce_splits_kernel(const acc_t* __restrict__ partial, int64_t splits,
                                     int64_t NC, int64_t C, const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ out) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= NC) return;
  acc_t acc = bias ? static_cast<acc_t>(bias[e % C]) : acc_t(0);
  for (int64_t s = 0; s < splits; ++s) acc += partial[s * NC + e];
  out[e] = static_cast<scalar_t>(acc);
}

// out[p] = g[p / k] . table[idx[p]], one warp per pair p = n * k + j.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDotWarps * 32)
    gather_dot_kernel(const acc_t* __restrict__ g, const int64_t* __restrict__ idx, int64_t pairs,
                      int64_t k, const scalar_t* __restrict__ table, int64_t d_ff, int64_t C,
                      acc_t* __restrict__ out) {
  const int64_t p = blockIdx.x * int64_t(kDotWarps) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (p >= pairs) return;
  const int64_t i = idx[p];
  CUDA_KERNEL_ASSERT(i >= 0 && i < d_ff && "indices must be in [0, d_ff)");
  const acc_t* gr = g + (p / k) * C;
  const scalar_t* tr = table + i * C;
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += 32) s += gr[c] * static_cast<acc_t>(tr[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[p] = s;
}

// out[idx[p], c] += v[p] * g[p / k, c] over work items (pair, column tile), grid-stride.
template <typename acc_t>
__global__ void __launch_bounds__(kColTile)
    scatter_rows_kernel(const acc_t* __restrict__ v, const int64_t* __restrict__ idx,
                        int64_t pairs, int64_t k, const acc_t* __restrict__ g, int64_t d_ff,
                        int64_t C, int64_t col_tiles, acc_t* __restrict__ out) {
  for (int64_t w = blockIdx.x; w < pairs * col_tiles; w += gridDim.x) {
    const int64_t p = w / col_tiles, c = (w % col_tiles) * kColTile + threadIdx.x;
    if (c >= C) continue;
    const int64_t i = idx[p];
    CUDA_KERNEL_ASSERT(i >= 0 && i < d_ff && "indices must be in [0, d_ff)");
    atomicAdd(out + i * C + c, v[p] * g[(p / k) * C + c]);
  }
}

// predicted_sparse_mlp, between its two gathers: in place on h [pairs] (the gathered dot
// products x . w_up[idx]), h = act(round(h + b_up[idx])), and pre = round(h + b_up[idx]).
template <typename scalar_t, typename acc_t>
__global__ void bias_activation_kernel(acc_t* __restrict__ h, const int64_t* __restrict__ idx,
                                       int64_t pairs, int64_t d_ff, const scalar_t* __restrict__ b_up,
                                       bool gelu, scalar_t* __restrict__ pre) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  CUDA_KERNEL_ASSERT(idx[p] >= 0 && idx[p] < d_ff && "indices must be in [0, d_ff)");
  const scalar_t v = static_cast<scalar_t>(h[p] + (b_up ? static_cast<acc_t>(b_up[idx[p]]) : acc_t(0)));
  pre[p] = v;
  const acc_t a = static_cast<acc_t>(v);
  h[p] = gelu ? acc_t(0.5) * a * (acc_t(1) + erf(a * acc_t(M_SQRT1_2))) : (a < acc_t(0) ? acc_t(0) : a);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace
}  // namespace leanformer
