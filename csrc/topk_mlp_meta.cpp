// Meta kernels of the top-k sparse MLP ops: the family's checks (the same the CPU and CUDA
// kernels run, csrc/topk_mlp_ops.h), then outputs of the right shape, dtype and strides and no
// data. The dispatcher runs them for meta tensors, and FakeTensorMode (torch.compile,
// torch.export) for fake ones, with symbolic sizes where the shapes are dynamic. The indices'
// values (below d_ff) are checked by the real kernels only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "topk_mlp_checks.h"

namespace leanformer {
namespace {

// A gradient the output mask leaves out is an empty [0] tensor, as in the kernels.
at::Tensor maybe_empty(bool wanted, c10::SymIntArrayRef shape, const at::TensorOptions& options) {
  return wanted ? at::empty_symint(shape, options) : at::empty({0}, options);
}

std::tuple<at::Tensor, at::Tensor> topk_activation_meta(const at::Tensor& h, int64_t k,
                                                        c10::string_view activation) {
  check_topk_activation_inputs(h, k);
  parse_activation(activation);
  const auto shape = with_last_size(h.sym_sizes(), k);
  return {at::empty_symint(shape, h.options()), at::empty_symint(shape, h.options().dtype(at::kLong))};
}

at::Tensor topk_activation_backward_meta(const at::Tensor& grad_values, const at::Tensor& h,
                                         const at::Tensor& indices, c10::string_view activation) {
  check_topk_activation_backward_inputs(grad_values, h, indices);
  parse_activation(activation);
  return at::empty_symint(h.sym_sizes(), h.options());
}

at::Tensor sparse_down_projection_meta(const at::Tensor& values, const at::Tensor& indices,
                                       const at::Tensor& w_down_t, const std::optional<at::Tensor>& bias) {
  check_sparse_down_projection_inputs(values, indices, w_down_t, bias);
  return at::empty_symint(with_last_size(values.sym_sizes(), w_down_t.sym_size(1)), values.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_down_projection_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& w_down_t,
    std::array<bool, 3> output_mask) {
  check_sparse_down_projection_backward_inputs(grad_y, values, indices, w_down_t);
  const auto opts = values.options();
  return {maybe_empty(output_mask[0], values.sym_sizes(), opts),
          maybe_empty(output_mask[1], w_down_t.sym_sizes(), opts),
          maybe_empty(output_mask[2], {w_down_t.sym_size(1)}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_mlp_meta(const at::Tensor& x, const at::Tensor& w_up,
                                                             const std::optional<at::Tensor>& b_up,
                                                             const at::Tensor& w_down_t,
                                                             const std::optional<at::Tensor>& b_down, int64_t k,
                                                             c10::string_view activation) {
  check_topk_mlp_inputs(x, w_up, b_up, w_down_t, b_down, k);
  parse_activation(activation);
  const auto shape = with_last_size(x.sym_sizes(), k);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(shape, x.options().dtype(at::kLong)),
          at::empty_symint(shape, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_mlp_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down_t,
    const at::Tensor& h_selected, const at::Tensor& indices, c10::string_view activation,
    std::array<bool, 5> output_mask) {
  check_topk_mlp_backward_inputs(grad_y, x, w_up, w_down_t, h_selected, indices);
  parse_activation(activation);
  const auto opts = x.options();
  return {maybe_empty(output_mask[0], x.sym_sizes(), opts), maybe_empty(output_mask[1], w_up.sym_sizes(), opts),
          maybe_empty(output_mask[2], {w_up.sym_size(0)}, opts),
          maybe_empty(output_mask[3], w_down_t.sym_sizes(), opts),
          maybe_empty(output_mask[4], {x.sym_size(-1)}, opts)};
}

std::tuple<at::Tensor, at::Tensor> predicted_sparse_mlp_meta(const at::Tensor& x, const at::Tensor& w_up,
                                                             const std::optional<at::Tensor>& b_up,
                                                             const at::Tensor& w_down_t,
                                                             const std::optional<at::Tensor>& b_down,
                                                             const at::Tensor& indices, c10::string_view activation) {
  check_predicted_sparse_mlp_inputs(x, w_up, b_up, w_down_t, b_down, indices);
  parse_activation(activation);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint(with_last_size(x.sym_sizes(), indices.sym_size(-1)), x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("topk_activation", &topk_activation_meta);
  m.impl("topk_activation_backward", &topk_activation_backward_meta);
  m.impl("sparse_down_projection", &sparse_down_projection_meta);
  m.impl("sparse_down_projection_backward", &sparse_down_projection_backward_meta);
  m.impl("topk_mlp", &topk_mlp_meta);
  m.impl("topk_mlp_backward", &topk_mlp_backward_meta);
  m.impl("predicted_sparse_mlp", &predicted_sparse_mlp_meta);
}

}  // namespace leanformer
