// quantized_linear on CUDA. NOTE: compiled here (nvcc, sm_80/sm_90), run in the CPU emulation,
// never yet run on a GPU.
//
// Two launches on the current stream (quantized_linear_kernels.cuh): x's rows rounded to int8
// per block of 32 into a temporary from the caching allocator, then the integer dot products
// and the fp32 chain per tile of 16 outputs and group of 16 rows. The result is the CPU
// kernel's, bit for bit: the same fp32 operations in the same order.
#include "../quantized_linear_checks.h"
#include "launch.h"
#include "quantized_linear_kernels.cuh"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace leanformer {
namespace {

at::Tensor quantized_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias,
                                 int64_t bits, int64_t out_features) {
  check_quantized_linear_inputs(x, qweight, scales, mins, bias, bits, out_features);
  const DeviceGuard device_guard(x.device());
  const int64_t K = x.size(-1), KB = K / kQlBlock, N = out_features, T = qweight.size(0);
  at::Tensor out = at::empty_symint(with_last_size(x.sym_sizes(), N), x.options());
  const int64_t M = leading_numel(x).expect_int();
  if (M == 0 || N == 0) return out;
  TORCH_CHECK(T < (int64_t(1) << 31), "quantized_linear on CUDA: too many output tiles");
  // Rows with unit stride along K (a row stride of their own is fine).
  at::Tensor x2 = x.reshape({M, K});
  if (K > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  // The codes are read as 4-byte words: a base off 16-byte alignment (a view at an offset) is copied.
  at::Tensor qc = qweight.contiguous();
  if (reinterpret_cast<uintptr_t>(qc.const_data_ptr()) % 16 != 0) qc = qc.clone();
  const at::Tensor sc = scales.contiguous();
  const std::optional<at::Tensor> mc = mins.has_value() ? std::optional<at::Tensor>(mins->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> bf =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  // The temporary: xq int8 [M, K] (16-byte aligned rows: K is a multiple of 32), then dx, sx
  // float and the code sums int32, [M, KB] each.
  const int64_t pairs = M * KB;
  at::Tensor tmp = at::empty({M * K + 3 * pairs * 4}, x.options().dtype(at::kByte));
  int8_t* xq = reinterpret_cast<int8_t*>(tmp.data_ptr<uint8_t>());
  float* dx = reinterpret_cast<float*>(tmp.data_ptr<uint8_t>() + M * K);
  float* sx = dx + pairs;
  int32_t* xsum = reinterpret_cast<int32_t*>(sx + pairs);
  const cudaStream_t stream = current_stream();
  const int64_t groups = (M + kQlRows - 1) / kQlRows;
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(std::min(groups, kQlMaxGridY)));
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (pairs > 0) {
      constexpr int64_t warps = kQuantizeThreads / 32;
      const int64_t cap = int64_t(device_properties().multiProcessorCount) * 16;
      const unsigned blocks = static_cast<unsigned>(std::min((pairs + warps - 1) / warps, cap));
      launch_kernel(quantize_rows_kernel<scalar_t>, blocks, kQuantizeThreads, 0, stream,
                    x2.const_data_ptr<scalar_t>(), x2.stride(0), M, KB, xq, dx, sx, xsum);
    }
    auto kernel = bits == 8 ? quantized_gemv_kernel<8, scalar_t> : quantized_gemv_kernel<4, scalar_t>;
    launch_kernel(kernel, grid, kQlThreads, 0, stream, qc.const_data_ptr<uint8_t>(),
                  sc.const_data_ptr<c10::Half>(), mc.has_value() ? mc->const_data_ptr<c10::Half>() : nullptr,
                  bf.has_value() ? bf->const_data_ptr<float>() : nullptr, static_cast<const int8_t*>(xq),
                  static_cast<const float*>(dx), static_cast<const float*>(sx), static_cast<const int32_t*>(xsum),
                  out.data_ptr<scalar_t>(), M, N, KB);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;  // the checks allow no other
  }
  return out;
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) { m.impl("quantized_linear", &quantized_linear_cuda); }

}  // namespace leanformer
