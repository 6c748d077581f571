// decode_attention on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), run in the CPU emulation,
// never yet run on a GPU.
//
// One launch, block (h, b) per query head and sequence (decode_attention_kernels.cuh). The
// values of lens are device-side asserts: checking them on the host would synchronize every
// decoding step.
#include "../decode_attention_checks.h"
#include "decode_attention_kernels.cuh"
#include "launch.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace leanformer {
namespace {

at::Tensor decode_attention_cuda(const at::Tensor& qkv_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& lens_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                 int64_t num_heads) {
  const DecodeAttentionShape sh =
      check_decode_attention_inputs(qkv_in, k_cache, v_cache, lens_in, cos_in, sin_in, num_heads);
  const DeviceGuard device_guard(qkv_in.device());
  at::Tensor out = at::empty({sh.B, sh.H * sh.D}, qkv_in.options());
  if (sh.B == 0) return out;
  TORCH_CHECK(sh.B <= kDecodeMaxGridY && sh.H < (int64_t(1) << 31),
              "decode_attention on CUDA: too many sequences or heads");
  const at::Tensor qkv = qkv_in.stride(1) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor lens = lens_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const size_t smem = static_cast<size_t>(decode_attention_smem_floats(sh.D)) * sizeof(float);
  const size_t smem_max = device_properties().sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= smem_max, "decode_attention on CUDA: the head dim D = ", sh.D, " needs ", smem,
              " bytes of shared memory, the device allows ", smem_max);
  const cudaStream_t stream = current_stream();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.D)));
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = decode_attention_kernel<scalar_t>;
    if (smem > 48 * 1024) set_max_dynamic_shared_memory(kernel, smem);
    const dim3 grid(static_cast<unsigned>(sh.H), static_cast<unsigned>(sh.B));
    launch_kernel(kernel, grid, kDecodeThreads, smem, stream, qkv.const_data_ptr<scalar_t>(), qkv.stride(0),
                  k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), lens.const_data_ptr<int64_t>(),
                  cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), out.data_ptr<scalar_t>(), sh.H, sh.Hkv,
                  sh.D, sh.L, sh.P, scale);
  };
  dispatch_decode_attention_dtype(qkv.scalar_type(), run);
  return out;
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace leanformer
