// sla_tree_commit on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), never yet run on a GPU.
//
// One launch per layer: block (b, h) owns S[b, h] (Dk x Dv) and z[b, h]; its threads stride
// over the Dk * Dv elements, each adding relu(k[node, d]) * v[node, e] along the accepted path
// in order (the CPU kernel's order, so both give the same sums). The conv tail of (b, h) is
// read whole into shared memory before any thread writes it. Path values are device-side
// asserts: checking them on the host would synchronize every decoding step.
#include "../tree_state_checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename state_t, typename kv_t, typename tail_t>
__global__ void __launch_bounds__(kThreads)
    sla_tree_commit_kernel(state_t* __restrict__ S, Strides4 ss, state_t* __restrict__ z, int64_t zs0, int64_t zs1,
                           int64_t zs2, const kv_t* __restrict__ k, Strides4 ks, const kv_t* __restrict__ v,
                           Strides4 vs, tail_t* __restrict__ tail, int64_t ts0, int64_t ts1, int64_t ts2, int64_t W,
                           const int64_t* __restrict__ path, int64_t n_max, const int64_t* __restrict__ num_accepted,
                           int64_t H, int64_t Dk, int64_t Dv, int64_t T) {
  extern __shared__ unsigned char smem[];
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

void sla_tree_commit_cuda(at::TensorList S, at::TensorList z, at::TensorList conv_tail, at::TensorList k,
                          at::TensorList v, const at::Tensor& path_in, const at::Tensor& num_accepted_in) {
  check_sla_tree_commit_inputs(S, z, conv_tail, k, v, path_in, num_accepted_in);
  const at::cuda::CUDAGuard device_guard(S[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
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
          sla_tree_commit_kernel<state_t, kv_t, tail_t><<<static_cast<unsigned>(B * H), kThreads, shared, stream>>>(
              Sl.data_ptr<state_t>(), strides_of(Sl), zl.data_ptr<state_t>(), zl.stride(0), zl.stride(1), zl.stride(2),
              k[l].const_data_ptr<kv_t>(), strides_of(k[l]), v[l].const_data_ptr<kv_t>(), strides_of(v[l]),
              has_tail ? tl.data_ptr<tail_t>() : nullptr, has_tail ? tl.stride(0) : 0, has_tail ? tl.stride(1) : 0,
              has_tail ? tl.stride(2) : 0, W, path.const_data_ptr<int64_t>(), path.size(1),
              num.const_data_ptr<int64_t>(), H, Dk, Dv, k[l].size(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CUDA, m) { m.impl("sla_tree_commit", &sla_tree_commit_cuda); }

}  // namespace leanformer
