// CUDA kernels of nm_sparse_linear and its backward (N:M packed format: csrc/ops.cpp,
// leanformer/sparse/nm_format.py). NOTE: compiled, register use checked with ptxas, index
// math checked by a CPU emulation (tests/test_nm_sparse_cuda.py); never yet run on a GPU.
//
// Dispatch (documented in leanformer.ops.nm_sparse_linear too):
//   tokens <= kMaxGemvTokens, fp32/fp16/bf16: nm_gemv_kernel (any N:M) -- reads only values +
//       meta, which is the decode-time saving;
//   more tokens, 2:4 fp16/bf16, rows % 32 == 0, K % 64 == 0, CUTLASS built for this GPU: the
//       sparse tensor-core GEMM (nm_sparse_linear_cutlass_sm80.cu / _sm90.cu);
//   otherwise (other N:M, fp32, fp64, odd shapes, no CUTLASS): the weight is decompressed to
//       dense by nm_scatter_gather_kernel and multiplied by cuBLAS (at::linear); the cases that
//       a 2:4 tensor-core GEMM would have served warn once.
// Backward: grad_values for <= kMaxGemvTokens tokens is nm_gemv_kernel in its gather-dot mode
// (one warp per row, each value's column gathered from the staged x tile and dotted with the
// row's grad_y); for more tokens cuBLAS forms the dense grad_y^T x and nm_scatter_gather_kernel
// gathers the kept entries. grad_x is grad_y @ decompress(S) through cuBLAS. All of it is
// deterministic: no atomics, every sum has a fixed order.
//
// nm_gemv_kernel: one warp per output row, 8 rows per block. The block stages a chunk of x
// (<= 8 tokens x `chunk` columns, as fp32) in shared memory, then each lane takes 8
// consecutive values of its row (one 16-byte load for fp16/bf16, two for fp32, when the
// pattern is compiled in and rows are 16-byte aligned) and the one meta word holding their 8
// indices (8 * bits <= 32 and a lane step starts on a multiple of 8 values, so the indices
// never straddle a word), decodes the columns and gathers x from shared memory. Shared memory
// is skewed by one float per 32 columns: neighbouring lanes' columns are 8 values apart
// (16 columns for 2:4, 32 for 1:4), which without the skew would land on the same banks.
// fp32 accumulation; a warp-shuffle reduction ends each row.
#include "nm_sparse_linear_cutlass.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "../nm_sparse_linear_checks.h"

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
  extern __shared__ float xs[];  // [kT][skewed_pitch(chunk)]
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

void launch_scatter_gather(bool scatter, const at::Tensor& values, const at::Tensor& meta,
                           const at::Tensor& dense, int64_t n, int64_t m) {
  const int64_t total = values.numel();
  if (total == 0) return;
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "nm_scatter_gather", [&] {
    auto kernel = scatter ? nm_scatter_gather_kernel<scalar_t, true> : nm_scatter_gather_kernel<scalar_t, false>;
    kernel<<<blocks, kElementwiseThreads, 0, stream>>>(
        values.data_ptr<scalar_t>(), meta.data_ptr<int32_t>(), dense.data_ptr<scalar_t>(), total,
        values.size(1), meta.size(1), dense.size(1), static_cast<int>(n), static_cast<int>(m));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The compiled-in patterns: the benchmarked 2:4 and 1:4; every other N:M runs the generic one.
template <typename scalar_t, int kT, bool kGrad>
void launch_gemv_pattern(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                         const scalar_t* bias, const scalar_t* grad_y, const at::Tensor& out,
                         int64_t n, int64_t m) {
  const int64_t rows = values.size(0), kc = values.size(1), K = x2d.size(1);
  const int tokens = static_cast<int>(x2d.size(0));
  // Chunk of x columns held in shared memory: as wide as fits, a multiple of kChunkAlign.
  const int64_t fit = static_cast<int64_t>(kGemvSmemBytes / sizeof(float) / kT) * 32 / 33 / kChunkAlign * kChunkAlign;
  const int64_t k_up = (K + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int chunk = static_cast<int>(std::max<int64_t>(kChunkAlign, std::min(fit, k_up)));
  const size_t smem = sizeof(float) * kT * skewed_pitch(chunk);
  const int64_t blocks = (rows + kGemvWarps - 1) / kGemvWarps;
  // 16-byte value loads need every row start aligned: kc % 8 == 0 and an aligned base.
  const bool aligned = kc % kLaneValues == 0 &&
                       reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  auto kernel = nm_gemv_kernel<scalar_t, kT, 0, 0, kGrad>;
  if (aligned && n == 2 && m == 4) kernel = nm_gemv_kernel<scalar_t, kT, 2, 4, kGrad>;
  if (aligned && n == 1 && m == 4) kernel = nm_gemv_kernel<scalar_t, kT, 1, 4, kGrad>;
  kernel<<<blocks, kGemvThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      x2d.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), meta.data_ptr<int32_t>(), bias, grad_y,
      out.data_ptr<scalar_t>(), tokens, rows, K, kc, meta.size(1), static_cast<int>(n), static_cast<int>(m),
      chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward (grad_y undefined) or grad_values (grad_y [T, rows]) for T <= kMaxGemvTokens.
void launch_gemv(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                 const std::optional<at::Tensor>& bias, const at::Tensor& grad_y, const at::Tensor& out,
                 int64_t n, int64_t m) {
  if (values.size(0) == 0) return;
  const bool grad = grad_y.defined();
  const int64_t tokens = x2d.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "nm_gemv", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "nm_sparse_linear: the CUDA GEMV kernel has no float64 instance");
    } else {
      const scalar_t* b = bias.has_value() && bias->defined() ? bias->data_ptr<scalar_t>() : nullptr;
      const scalar_t* g = grad ? grad_y.data_ptr<scalar_t>() : nullptr;
      auto run = [&](auto t_tag) {
        constexpr int kT = decltype(t_tag)::value;
        if (grad)
          launch_gemv_pattern<scalar_t, kT, true>(x2d, values, meta, b, g, out, n, m);
        else
          launch_gemv_pattern<scalar_t, kT, false>(x2d, values, meta, b, g, out, n, m);
      };
      if (tokens <= 1)
        run(std::integral_constant<int, 1>{});
      else if (tokens <= 2)
        run(std::integral_constant<int, 2>{});
      else if (tokens <= 4)
        run(std::integral_constant<int, 4>{});
      else
        run(std::integral_constant<int, 8>{});
    }
  });
}

bool use_gemv(const at::Tensor& x2d) {
  return x2d.size(0) <= kMaxGemvTokens && x2d.scalar_type() != at::kDouble;
}

// 2:4 fp16/bf16 with tensor-core-friendly shapes: the CUTLASS GEMM when this build has it.
// The return says whether it ran; the reasons it did not are warned about once.
bool cutlass_eligible(const at::Tensor& x2d, int64_t rows, int64_t n, int64_t m) {
  const auto dtype = x2d.scalar_type();
  if (n != 2 || m != 4 || (dtype != at::kHalf && dtype != at::kBFloat16)) return false;
  const int64_t K = x2d.size(1);
  if (rows == 0 || K == 0) return false;  // nothing for tensor cores to do (and an empty grid)
  if (rows % kCutlassRowMultiple != 0 || K % kCutlassKMultiple != 0) {
    TORCH_WARN_ONCE("nm_sparse_linear: 2:4 ", dtype, " with rows = ", rows, ", K = ", K,
                    " does not fit the sparse tensor-core GEMM (rows % ", kCutlassRowMultiple,
                    ", K % ", kCutlassKMultiple, " must be 0); using decompress + cuBLAS dense GEMM");
    return false;
  }
  if (!nm24_cutlass_built_for(x2d.get_device())) {
    TORCH_WARN_ONCE("nm_sparse_linear: this build has no CUTLASS 2:4 sparse GEMM for this GPU (built with "
                    "LEANFORMER_CUTLASS=0 or without its architecture); 2:4 falls back to decompress + "
                    "cuBLAS dense GEMM");
    return false;
  }
  return true;
}

at::Tensor nm_sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const std::optional<at::Tensor>& bias, int64_t n, int64_t m) {
  check_nm_sparse_linear_inputs(x, values, meta, bias, n, m);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), rows = values.size(0);
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = rows;
  if (use_gemv(x2d)) {
    at::Tensor y = at::empty({x2d.size(0), rows}, x.options());
    if (x2d.size(0) > 0) launch_gemv(x2d, v, mt, b, at::Tensor(), y, n, m);
    return y.view(out_shape);
  }
  if (cutlass_eligible(x2d, rows, n, m)) return nm24_linear_cutlass(x2d, v, mt, b).view(out_shape);
  if (!(n == 2 && m == 4 && x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble))
    TORCH_WARN_ONCE("nm_sparse_linear: ", n, ":", m, " ", x.scalar_type(), " at ", x2d.size(0),
                    " tokens runs as decompress + cuBLAS dense GEMM (the GEMV kernel takes <= ", kMaxGemvTokens,
                    " tokens in fp32/fp16/bf16, the sparse tensor cores 2:4 fp16/bf16)");
  const at::Tensor dense = nm_decompress_cuda(v, mt, n, m, K);
  return at::linear(x2d, dense, b).view(out_shape);
}

std::tuple<at::Tensor, at::Tensor> nm_sparse_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
    int64_t n, int64_t m, std::array<bool, 2> output_mask) {
  check_nm_sparse_linear_backward_inputs(grad_y, x, values, meta, n, m);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(-1), rows = values.size(0);
  const at::Tensor x2d = x.reshape({-1, K}).contiguous();
  const at::Tensor gy2d = grad_y.reshape({-1, rows}).contiguous();
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  at::Tensor grad_x = at::empty({0}, x.options()), grad_values = at::empty({0}, values.options());
  if (output_mask[0]) {
    const at::Tensor dense = nm_decompress_cuda(v, mt, n, m, K);
    grad_x = at::matmul(gy2d, dense).view(x.sizes());
  }
  if (output_mask[1]) {
    grad_values = at::empty_like(v);
    if (x2d.size(0) == 0) {
      grad_values.zero_();
    } else if (use_gemv(x2d)) {
      launch_gemv(x2d, v, mt, std::nullopt, gy2d, grad_values, n, m);
    } else {
      const at::Tensor dense_grad = at::matmul(gy2d.t(), x2d).contiguous();  // [rows, K]
      launch_scatter_gather(false, grad_values, mt, dense_grad, n, m);
    }
  }
  return {grad_x, grad_values};
}

}  // namespace

at::Tensor nm_decompress_cuda(const at::Tensor& values, const at::Tensor& meta, int64_t n, int64_t m,
                              int64_t K) {
  at::Tensor dense = at::zeros({values.size(0), K}, values.options());
  launch_scatter_gather(true, values, meta, dense, n, m);
  return dense;
}

TORCH_LIBRARY_IMPL(leanformer, CUDA, m) {
  m.impl("nm_sparse_linear", &nm_sparse_linear_cuda);
  m.impl("nm_sparse_linear_backward", &nm_sparse_linear_backward_cuda);
}

}  // namespace leanformer
