// tree_dwconv on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), never yet run on a GPU.
//
// One thread per output element (b, t, h, d), d fastest so a warp reads consecutive channels:
// it walks t's ancestor chain kernel_size steps up (into the conv tail past the root) and sums
// the taps in the CPU kernel's order. Parent values are device-side asserts: checking them on
// the host would synchronize every decoding step.
#include "../tree_state_checks.h"
#include "launch.h"
#include "tree_state_dwconv_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {
namespace {

at::Tensor tree_dwconv_cuda(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents_in,
                            const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  check_tree_dwconv_inputs(v, conv_tail, parents_in, weight_in, bias_in);
  const DeviceGuard device_guard(v.device());
  const int64_t B = v.size(0), T = v.size(1), H = v.size(2), D = v.size(3), K = weight_in.size(1);
  at::Tensor out = at::empty({B, T, H, D}, v.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  TORCH_CHECK(n / kThreads < (int64_t(1) << 31) - 1, "tree_dwconv on CUDA: v too large");
  const at::Tensor parents = parents_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "tree_dwconv_cuda", [&] {
    launch_kernel(tree_dwconv_kernel<scalar_t>, static_cast<unsigned>((n + kThreads - 1) / kThreads),
                  kThreads, 0, stream, v.const_data_ptr<scalar_t>(), v.stride(0), v.stride(1), v.stride(2),
                  v.stride(3), conv_tail.const_data_ptr<scalar_t>(), conv_tail.stride(0),
                  conv_tail.stride(1), conv_tail.stride(2), parents.const_data_ptr<int64_t>(),
                  parents.dim() == 2 ? T : 0, weight.const_data_ptr<scalar_t>(),
                  bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, T, H, D, K);
  });
  return out;
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) { m.impl("tree_dwconv", &tree_dwconv_cuda); }

}  // namespace leanformer
