// tree_dwconv on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), never yet run on a GPU.
//
// One thread per output element (b, t, h, d), d fastest so a warp reads consecutive channels:
// it walks t's ancestor chain kernel_size steps up (into the conv tail past the root) and sums
// the taps in the CPU kernel's order. Parent values are device-side asserts: checking them on
// the host would synchronize every decoding step.
#include "../tree_state_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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
  using acc_t = at::opmath_type<T>;
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

at::Tensor tree_dwconv_cuda(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents_in,
                            const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  check_tree_dwconv_inputs(v, conv_tail, parents_in, weight_in, bias_in);
  const at::cuda::CUDAGuard device_guard(v.device());
  const int64_t B = v.size(0), T = v.size(1), H = v.size(2), D = v.size(3), K = weight_in.size(1);
  at::Tensor out = at::empty({B, T, H, D}, v.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  TORCH_CHECK(n / kThreads < (int64_t(1) << 31) - 1, "tree_dwconv on CUDA: v too large");
  const at::Tensor parents = parents_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "tree_dwconv_cuda", [&] {
    tree_dwconv_kernel<scalar_t><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        conv_tail.const_data_ptr<scalar_t>(), conv_tail.stride(0), conv_tail.stride(1), conv_tail.stride(2),
        parents.const_data_ptr<int64_t>(), parents.dim() == 2 ? T : 0, weight.const_data_ptr<scalar_t>(),
        bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, T, H, D, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CUDA, m) { m.impl("tree_dwconv", &tree_dwconv_cuda); }

}  // namespace leanformer
