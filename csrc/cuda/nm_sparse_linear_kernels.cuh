// The kernels of nm_sparse_linear and its backward other than the CUTLASS tensor-core GEMMs
// (the GEMV / gather-dot kernel and the decompress / gather kernel), torch-free, and their
// launch constants; the launchers and the dispatch are in nm_sparse_linear_cuda.cu. Compiled by
// nvcc for the GPU and, in the emulation build, for the CPU (device.cuh).
#pragma once

#include "../nm_sparse_linear_format.h"
#include "device.cuh"

#include <cstdint>
#include <limits>

namespace leanformer {
namespace {

constexpr int kMaxGemvTokens = 8;
constexpr int kGemvWarps = 8;  // rows per block
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kLaneValues = 8;                     // values (one meta word) per lane step
constexpr int kWarpValues = 32 * kLaneValues;      // values per warp step
constexpr int kChunkAlign = 128;                   // chunk columns: multiple of 8 * m (m <= 16)
constexpr int kGemvSmemBytes = 40 * 1024;          // under the 48 KB default limit
constexpr int kElementwiseThreads = 256;

__device__ __forceinline__ int skew(int c) { return c + (c >> 5); }
inline int skewed_pitch(int chunk) { return chunk + chunk / 32; }

// 8 values as one (fp16/bf16) or two (fp32) 16-byte words.
template <typename scalar_t>
union Pack8 {
  uint4 raw[kLaneValues * sizeof(scalar_t) / 16];
  scalar_t e[kLaneValues];
};

// The 8 values j0 .. j0+7 of a row as fp32; kVec: aligned 16-byte loads.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load_values(const scalar_t* __restrict__ p, int count, float (&v)[8]) {
  if constexpr (kVec) {
    Pack8<scalar_t> u;
#pragma unroll
    for (int w = 0; w < int(sizeof(u.raw) / 16); ++w) u.raw[w] = __ldg(reinterpret_cast<const uint4*>(p) + w);
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i) v[i] = static_cast<float>(u.e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i) v[i] = i < count ? static_cast<float>(p[i]) : 0.f;
  }
}

template <typename scalar_t, bool kVec>
__device__ __forceinline__ void store_values(scalar_t* __restrict__ p, int count, const float (&v)[8]) {
  if constexpr (kVec) {
    Pack8<scalar_t> u;
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i) u.e[i] = static_cast<scalar_t>(v[i]);
#pragma unroll
    for (int w = 0; w < int(sizeof(u.raw) / 16); ++w) reinterpret_cast<uint4*>(p)[w] = u.raw[w];
  } else {
#pragma unroll
    for (int i = 0; i < kLaneValues; ++i)
      if (i < count) p[i] = static_cast<scalar_t>(v[i]);
  }
}

// Columns (relative to the chunk start c0) of values j0 .. j0+7 (j0 % 8 == 0) from the meta
// word holding their indices. kN > 0: the pattern is compiled in (kN divides 8, so j0 starts
// a group and the group of value e is e / kN).
template <int kN, int kM>
__device__ __forceinline__ void decode_columns(uint32_t word, int shift, int64_t j0, int n, int m,
                                               int64_t c0, int (&col)[8]) {
  if constexpr (kN > 0) {
    constexpr int kBits = kM == 2 ? 1 : (kM == 4 ? 2 : 4);
    const int base = static_cast<int>(j0 / kN * kM - c0);
#pragma unroll
    for (int e = 0; e < kLaneValues; ++e)
      col[e] = base + (e / kN) * kM + static_cast<int>((word >> (shift + e * kBits)) & ((1u << kBits) - 1));
  } else {
    const int bits = nm_meta_bits(m);
    const int64_t g = j0 / n;
    int t = static_cast<int>(j0 - g * n);
    int base = static_cast<int>(g * m - c0);
#pragma unroll
    for (int e = 0; e < kLaneValues; ++e) {
      col[e] = base + static_cast<int>((word >> (shift + e * bits)) & ((1u << bits) - 1));
      if (++t == n) {
        t = 0;
        base += m;
      }
    }
  }
}

// kGradValues = false: y[t, row] = sum_j values[row, j] x[t, col(row, j)] + bias[row].
// kGradValues = true:  grad_values[row, j] = sum_t grad_y[t, row] x[t, col(row, j)].
// kT >= tokens (padded tokens read zeros). kN = 0: the pattern (n, m) is read at run time and
// values are loaded one by one (no alignment assumed).
template <typename scalar_t, int kT, int kN, int kM, bool kGradValues>
__global__ void __launch_bounds__(kGemvThreads)
    nm_gemv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ values,
                   const int32_t* __restrict__ meta, const scalar_t* __restrict__ bias,
                   const scalar_t* __restrict__ grad_y, scalar_t* __restrict__ out, int tokens,
                   int64_t rows, int64_t K, int64_t kc, int64_t words, int n, int m, int chunk) {
  LF_DYNAMIC_SHARED(float, xs);  // [kT][skewed_pitch(chunk)]
  constexpr bool kVec = kN > 0;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  const bool active = row < rows;
  const int n_ = kN > 0 ? kN : n, m_ = kN > 0 ? kM : m, bits = nm_meta_bits(m_);
  const int pitch = chunk + chunk / 32;
  const scalar_t* vrow = values + (active ? row : 0) * kc;
  scalar_t* grow = out + (active ? row : 0) * kc;  // grad_values row
  const uint32_t* mrow = reinterpret_cast<const uint32_t*>(meta) + (active ? row : 0) * words;

  float acc[kT];  // forward: per-token sums; grad: this row's grad_y
#pragma unroll
  for (int t = 0; t < kT; ++t)
    acc[t] = (kGradValues && active && t < tokens) ? static_cast<float>(grad_y[t * rows + row]) : 0.f;

  for (int64_t c0 = 0; c0 < K; c0 += chunk) {
    const int width = static_cast<int>(K - c0 < chunk ? K - c0 : chunk);
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < kT * chunk; i += kGemvThreads) {
      const int t = i / chunk, c = i - t * chunk;
      xs[t * pitch + skew(c)] = (t < tokens && c < width) ? static_cast<float>(x[t * K + c0 + c]) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    // width is a multiple of m (chunk is, and so is K), so [v0, v1) are whole groups and
    // v1 - v0 is a multiple of 8 except at the row's end.
    const int64_t v0 = c0 / m_ * n_;
    const int64_t v1 = (c0 + width) / m_ * n_;
#pragma unroll 2
    for (int64_t j0 = v0 + lane * kLaneValues; j0 < v1; j0 += kWarpValues) {
      const int count = static_cast<int>(v1 - j0 < kLaneValues ? v1 - j0 : kLaneValues);
      const int64_t bitpos = j0 * bits;
      const uint32_t word = __ldg(mrow + (bitpos >> 5));
      int col[kLaneValues];
      decode_columns<kN, kM>(word, static_cast<int>(bitpos & 31), j0, n_, m_, c0, col);
      if constexpr (!kGradValues) {
        float v[kLaneValues];
        load_values<scalar_t, kVec>(vrow + j0, count, v);
#pragma unroll
        for (int e = 0; e < kLaneValues; ++e) {
          if (kVec || e < count) {
            const float* xc = xs + skew(col[e]);
#pragma unroll
            for (int t = 0; t < kT; ++t) acc[t] = fmaf(v[e], xc[t * pitch], acc[t]);
          }
        }
      } else {
        float g[kLaneValues];
#pragma unroll
        for (int e = 0; e < kLaneValues; ++e) {
          g[e] = 0.f;
          if (kVec || e < count) {
            const float* xc = xs + skew(col[e]);
#pragma unroll
            for (int t = 0; t < kT; ++t) g[e] = fmaf(acc[t], xc[t * pitch], g[e]);
          }
        }
        store_values<scalar_t, kVec>(grow + j0, count, g);
      }
    }
  }
  if constexpr (!kGradValues) {
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
    if (active && lane == 0) {
      const float b = bias ? static_cast<float>(bias[row]) : 0.f;
#pragma unroll
      for (int t = 0; t < kT; ++t)
        if (t < tokens) out[t * rows + row] = static_cast<scalar_t>(acc[t] + b);
    }
  }
}

// kScatter: dense[row, col(row, j)] = values[row, j] (dense zeroed beforehand; columns of a
// row are distinct, so no two threads write one element). Else the gather:
// values[row, j] = dense[row, col(row, j)]. One thread per value.
template <typename scalar_t, bool kScatter>
__global__ void __launch_bounds__(kElementwiseThreads)
    nm_scatter_gather_kernel(scalar_t* __restrict__ values, const int32_t* __restrict__ meta,
                             scalar_t* __restrict__ dense, int64_t total, int64_t kc, int64_t words,
                             int64_t K, int n, int m) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
  if (i >= total) return;
  const int bits = nm_meta_bits(m);
  const int64_t row = i / kc, j = i - row * kc, bitpos = j * bits;
  const uint32_t word = reinterpret_cast<const uint32_t*>(meta)[row * words + (bitpos >> 5)];
  const int64_t col = j / n * m + ((word >> (bitpos & 31)) & ((1u << bits) - 1));
  if constexpr (kScatter)
    dense[row * K + col] = values[i];
  else
    values[i] = dense[row * K + col];
}

// Whether row `meta_row` of S keeps column c (holds one of its values; a pruned entry is a zero).
__device__ __forceinline__ bool keeps_column(const int32_t* __restrict__ meta_row, int64_t c, int n, int m) {
  const int bits = nm_meta_bits(m);
  const int64_t g = c / m;
  const uint32_t in_group = static_cast<uint32_t>(c - g * m), field = (1u << bits) - 1;
  for (int64_t j = g * n; j < (g + 1) * n; ++j) {
    const int64_t bit = j * bits;
    if (((static_cast<uint32_t>(meta_row[bit >> 5]) >> (bit & 31)) & field) == in_group) return true;
  }
  return false;
}

// y = x @ S^T from the sparse kernels (the GEMV, CUTLASS), made the dense product's for tokens
// with an inf or NaN in x, as on the CPU: y[t, r] = NaN where row r prunes a column c with
// x[t, c] non-finite (0 * inf = 0 * NaN = NaN in x @ S_dense^T). One block per token: its
// threads scan x[t] for a non-finite value; only such a token's rows are then checked, each
// against every non-finite column. Finite inputs cost the scan of x.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    nm_fix_nonfinite_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ meta,
                            scalar_t* __restrict__ y, int64_t K, int64_t rows, int64_t words, int n,
                            int m) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ int any_nonfinite;
  const scalar_t* xt = x + static_cast<int64_t>(blockIdx.x) * K;
  if (threadIdx.x == 0) any_nonfinite = 0;
  __syncthreads();
  bool found = false;
  for (int64_t c = threadIdx.x; c < K; c += kElementwiseThreads) {
    const acc_t v = static_cast<acc_t>(xt[c]);
    found |= (v - v) != acc_t(0);  // inf - inf and NaN - NaN are NaN
  }
  if (found) any_nonfinite = 1;
  __syncthreads();
  if (!any_nonfinite) return;
  scalar_t* yt = y + static_cast<int64_t>(blockIdx.x) * rows;
  for (int64_t r = threadIdx.x; r < rows; r += kElementwiseThreads) {
    const int32_t* meta_row = meta + r * words;
    for (int64_t c = 0; c < K; ++c) {
      const acc_t v = static_cast<acc_t>(xt[c]);
      if ((v - v) != acc_t(0) && !keeps_column(meta_row, c, n, m)) {
        yt[r] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
        break;
      }
    }
  }
}

}  // namespace
}  // namespace leanformer
