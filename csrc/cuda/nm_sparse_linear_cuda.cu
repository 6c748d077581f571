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
#include "launch.h"
#include "nm_sparse_linear_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "../nm_sparse_linear_checks.h"

namespace leanformer {
namespace {


void launch_scatter_gather(bool scatter, const at::Tensor& values, const at::Tensor& meta,
                           const at::Tensor& dense, int64_t n, int64_t m) {
  const int64_t total = values.numel();
  if (total == 0) return;
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "nm_scatter_gather", [&] {
    auto kernel = scatter ? nm_scatter_gather_kernel<scalar_t, true> : nm_scatter_gather_kernel<scalar_t, false>;
    launch_kernel(kernel, blocks, kElementwiseThreads, 0, stream, values.data_ptr<scalar_t>(),
                  meta.data_ptr<int32_t>(), dense.data_ptr<scalar_t>(), total, values.size(1), meta.size(1),
                  dense.size(1), static_cast<int>(n), static_cast<int>(m));
  });
}

// y [tokens, rows] of the GEMV or CUTLASS made the dense product's where x has an inf or NaN
// (nm_fix_nonfinite_kernel); decompress + cuBLAS is the dense product already.
void fix_nonfinite_tokens(const at::Tensor& x2d, const at::Tensor& meta, const at::Tensor& y, int64_t n,
                          int64_t m) {
  const int64_t tokens = x2d.size(0), K = x2d.size(1), rows = y.size(1);
  if (tokens == 0 || K == 0 || rows == 0) return;
  TORCH_CHECK(tokens < (int64_t(1) << 31), "nm_sparse_linear on CUDA: too many tokens (", tokens, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "nm_fix_nonfinite", [&] {
    launch_kernel(nm_fix_nonfinite_kernel<scalar_t>, static_cast<unsigned>(tokens), kElementwiseThreads, 0,
                  current_stream(), x2d.data_ptr<scalar_t>(), meta.data_ptr<int32_t>(), y.data_ptr<scalar_t>(),
                  K, rows, meta.size(1), static_cast<int>(n), static_cast<int>(m));
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
  launch_kernel(kernel, blocks, kGemvThreads, smem, current_stream(), x2d.data_ptr<scalar_t>(),
                values.data_ptr<scalar_t>(), meta.data_ptr<int32_t>(), bias, grad_y,
                out.data_ptr<scalar_t>(), tokens, rows, K, kc, meta.size(1), static_cast<int>(n),
                static_cast<int>(m), chunk);
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
  DeviceGuard guard(x.device());
  const int64_t K = x.size(-1), rows = values.size(0);
  // Tokens explicitly: reshape's -1 is ambiguous with no columns (K == 0).
  const int64_t tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2d = x.reshape({tokens, K}).contiguous();
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = rows;
  if (use_gemv(x2d)) {
    at::Tensor y = at::empty({x2d.size(0), rows}, x.options());
    if (x2d.size(0) > 0) launch_gemv(x2d, v, mt, b, at::Tensor(), y, n, m);
    fix_nonfinite_tokens(x2d, mt, y, n, m);
    return y.view(out_shape);
  }
  if (cutlass_eligible(x2d, rows, n, m)) {
    at::Tensor y = nm24_linear_cutlass(x2d, v, mt, b).contiguous();
    fix_nonfinite_tokens(x2d, mt, y, n, m);
    return y.view(out_shape);
  }
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
  DeviceGuard guard(x.device());
  const int64_t K = x.size(-1), rows = values.size(0);
  // Tokens explicitly: reshape's -1 is ambiguous with no columns (K == 0).
  const int64_t tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2d = x.reshape({tokens, K}).contiguous();
  const at::Tensor gy2d = grad_y.reshape({tokens, rows}).contiguous();
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

LEANFORMER_CUDA_LIBRARY_IMPL(m) {
  m.impl("nm_sparse_linear", &nm_sparse_linear_cuda);
  m.impl("nm_sparse_linear_backward", &nm_sparse_linear_backward_cuda);
}

}  // namespace leanformer
