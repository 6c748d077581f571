// Meta kernels of the N:M sparse linear ops: the family's checks (the same the CPU and CUDA
// kernels run), then outputs of the right shape, dtype and strides and no data. The dispatcher
// runs them for meta tensors, and FakeTensorMode (torch.compile, torch.export) for fake ones,
// with symbolic sizes where the shapes are dynamic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "nm_sparse_linear_checks.h"

namespace leanformer {
namespace {

at::Tensor nm_sparse_linear_meta(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const std::optional<at::Tensor>& bias, int64_t n, int64_t m) {
  check_nm_sparse_linear_inputs(x, values, meta, bias, n, m);
  return at::empty_symint(with_last_size(x.sym_sizes(), values.sym_size(0)), x.options());
}

// A gradient the output mask leaves out is an empty [0] tensor, as in the kernels.
std::tuple<at::Tensor, at::Tensor> nm_sparse_linear_backward_meta(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& values, const at::Tensor& meta,
                                                                  int64_t n, int64_t m,
                                                                  std::array<bool, 2> output_mask) {
  check_nm_sparse_linear_backward_inputs(grad_y, x, values, meta, n, m);
  return {output_mask[0] ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options()),
          output_mask[1] ? at::empty_symint(values.sym_sizes(), values.options())
                         : at::empty({0}, values.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("nm_sparse_linear", &nm_sparse_linear_meta);
  m.impl("nm_sparse_linear_backward", &nm_sparse_linear_backward_meta);
}

}  // namespace leanformer
