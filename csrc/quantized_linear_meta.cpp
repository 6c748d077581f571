// Meta kernel of quantized_linear: the checks the CPU and CUDA kernels run, then an output of the
// right shape and dtype and no data (torch.compile / export trace it on fake tensors).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "quantized_linear_checks.h"

namespace leanformer {
namespace {

at::Tensor quantized_linear_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias,
                                 int64_t bits, int64_t out_features) {
  check_quantized_linear_inputs(x, qweight, scales, mins, bias, bits, out_features);
  return at::empty_symint(with_last_size(x.sym_sizes(), out_features), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) { m.impl("quantized_linear", &quantized_linear_meta); }

}  // namespace leanformer
