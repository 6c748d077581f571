// sla_tree_commit on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), never yet run on a GPU.
//
// One launch per layer: block (b, h) owns S[b, h] (Dk x Dv) and z[b, h]; its threads stride
// over the Dk * Dv elements, each adding relu(k[node, d]) * v[node, e] along the accepted path
// in order (the CPU kernel's order, so both give the same sums). The conv tail of (b, h) is
// read whole into shared memory before any thread writes it. Path values are device-side
// asserts: checking them on the host would synchronize every decoding step.
#include "../tree_state_checks.h"
#include "launch.h"
#include "tree_state_commit_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {
namespace {


inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
void sla_tree_commit_cuda(at::TensorList S, at::TensorList z, at::TensorList conv_tail, at::TensorList k,
                          at::TensorList v, const at::Tensor& path_in, const at::Tensor& num_accepted_in) {
  check_sla_tree_commit_inputs(S, z, conv_tail, k, v, path_in, num_accepted_in);
  // Written in place through their strides: refuse an expanded S, z or tail (stride 0 over the
  // batch), as the CPU kernel does; every sequence's block would race on the one shared row.
  for (size_t l = 0; l < S.size(); ++l) {
    at::assert_no_internal_overlap(S[l]);
    at::assert_no_internal_overlap(z[l]);
    if (!conv_tail.empty()) at::assert_no_internal_overlap(conv_tail[l]);
  }
  const DeviceGuard device_guard(S[0].device());
  const cudaStream_t stream = current_stream();
  const at::Tensor path = path_in.contiguous(), num = num_accepted_in.contiguous();
  const int64_t B = S[0].size(0), H = S[0].size(1), Dk = S[0].size(2), Dv = S[0].size(3);
  if (B * H == 0) return;
  TORCH_CHECK(B * H <= (int64_t(1) << 31) - 1, "sla_tree_commit on CUDA: B * H too large");
  for (size_t l = 0; l < S.size(); ++l) {
    at::Tensor Sl = S[l], zl = z[l];
    const bool has_tail = !conv_tail.empty() && conv_tail[l].size(2) > 0;
    at::Tensor tl = has_tail ? conv_tail[l] : at::Tensor();
    const int64_t W = has_tail ? tl.size(2) : 0;
    AT_DISPATCH_FLOATING_TYPES(Sl.scalar_type(), "sla_tree_commit_cuda", [&] {
      using state_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k[l].scalar_type(), "sla_tree_commit_cuda", [&] {
        using kv_t = scalar_t;
        const auto tail_type = has_tail ? tl.scalar_type() : k[l].scalar_type();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tail_type, "sla_tree_commit_cuda", [&] {
          using tail_t = scalar_t;
          const size_t shared = has_tail ? static_cast<size_t>(Dv * W) * sizeof(tail_t) : 0;
          launch_kernel(sla_tree_commit_kernel<state_t, kv_t, tail_t>, static_cast<unsigned>(B * H),
                        kThreads, shared, stream, Sl.data_ptr<state_t>(), strides_of(Sl),
                        zl.data_ptr<state_t>(), zl.stride(0), zl.stride(1), zl.stride(2),
                        k[l].const_data_ptr<kv_t>(), strides_of(k[l]), v[l].const_data_ptr<kv_t>(),
                        strides_of(v[l]), has_tail ? tl.data_ptr<tail_t>() : nullptr,
                        has_tail ? tl.stride(0) : 0, has_tail ? tl.stride(1) : 0,
                        has_tail ? tl.stride(2) : 0, W, path.const_data_ptr<int64_t>(), path.size(1),
                        num.const_data_ptr<int64_t>(), H, Dk, Dv, k[l].size(1));
        });
      });
    });
  }
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) { m.impl("sla_tree_commit", &sla_tree_commit_cuda); }

}  // namespace leanformer
