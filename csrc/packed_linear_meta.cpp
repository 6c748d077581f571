// Meta kernels of the packed_linear family: the checks the CPU kernels run, then an output of
// the right shape, dtype and strides and no data. The dispatcher runs them for meta tensors, and
// FakeTensorMode (torch.compile, torch.export) for the fake tensors of CPU tensors, with symbolic
// sizes where the shapes are dynamic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "packed_linear_checks.h"

namespace leanformer {
namespace {

at::Tensor packed_linear_meta(const at::Tensor& x, const at::Tensor& packed_weight,
                              const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_packed_linear_inputs(x, packed_weight, bias, out_features);
  return at::empty_symint(with_last_size(x.sym_sizes(), out_features), x.options());
}

at::Tensor packed_swiglu_meta(const at::Tensor& x, const at::Tensor& packed_gate_up, int64_t hidden) {
  check_packed_swiglu_inputs(x, packed_gate_up, hidden);
  return at::empty_symint(with_last_size(x.sym_sizes(), hidden), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("packed_linear", &packed_linear_meta);
  m.impl("packed_swiglu", &packed_swiglu_meta);
}

}  // namespace leanformer
