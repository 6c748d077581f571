// Meta kernels of the RepBN ops: the family's checks (the same the CPU and CUDA kernels run),
// then outputs of the right shape, dtype and strides and no data. The dispatcher runs them for
// meta tensors, and FakeTensorMode (torch.compile, torch.export) for fake ones, with symbolic
// sizes where the shapes are dynamic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "rep_batchnorm_checks.h"

namespace leanformer {
namespace {

// y like x (contiguous), mean and invstd [C] in the parameter dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_outputs(const at::Tensor& x) {
  const auto popts = x.options().dtype(rep_batchnorm_param_dtype(x));
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint({x.sym_size(-1)}, popts),
          at::empty_symint({x.sym_size(-1)}, popts)};
}

at::Tensor param_grad(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(-1)}, x.options().dtype(rep_batchnorm_param_dtype(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rep_batchnorm_meta(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha,
    const at::Tensor& running_mean, const at::Tensor& running_var, bool training, double eps,
    const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_inputs_sym(x, weight, bias, alpha, running_mean, running_var, training, mask);
  return norm_outputs(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rep_batchnorm_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_backward_inputs_sym(grad_y, x, weight, alpha, mean, invstd, mask);
  return {at::empty_symint(x.sym_sizes(), x.options()), param_grad(x), param_grad(x),
          at::empty_symint(alpha.sym_sizes(), alpha.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> progressive_norm_meta(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& alpha, const at::Tensor& running_mean,
    const at::Tensor& running_var, double gamma, bool training, double ln_eps, double bn_eps,
    const std::optional<at::Tensor>& mask) {
  check_progressive_norm_inputs_sym(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean, running_var,
                                    gamma, training, mask);
  return norm_outputs(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> progressive_norm_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& bn_weight,
    const at::Tensor& alpha, const at::Tensor& mean, const at::Tensor& invstd, double gamma, bool training,
    double ln_eps, const std::optional<at::Tensor>& mask) {
  check_progressive_norm_backward_inputs_sym(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd, mask);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          param_grad(x),
          param_grad(x),
          param_grad(x),
          param_grad(x),
          at::empty_symint(alpha.sym_sizes(), alpha.options())};
}

at::Tensor rep_batchnorm_stats_meta(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check_norm_input_sym(x, mask);
  return at::empty_symint({2 * x.sym_size(-1) + 1}, x.options().dtype(at::kDouble));
}

at::Tensor progressive_norm_backward_reduce_meta(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& mean, const at::Tensor& invstd, double gamma,
                                                 double ln_eps) {
  check_norm_backward_reduce_inputs_sym(grad_y, x, mean, invstd, gamma);
  return at::empty_symint({4, x.sym_size(-1)}, x.options().dtype(at::kDouble));
}

at::Tensor progressive_norm_backward_elemt_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat, double gamma, double ln_eps,
    const std::optional<at::Tensor>& mask) {
  check_norm_backward_elemt_inputs_sym(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd, mean_dy,
                                       mean_dy_xhat, gamma, mask);
  return at::empty_symint(x.sym_sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("rep_batchnorm", &rep_batchnorm_meta);
  m.impl("rep_batchnorm_backward", &rep_batchnorm_backward_meta);
  m.impl("progressive_norm", &progressive_norm_meta);
  m.impl("progressive_norm_backward", &progressive_norm_backward_meta);
  m.impl("rep_batchnorm_stats", &rep_batchnorm_stats_meta);
  m.impl("progressive_norm_backward_reduce", &progressive_norm_backward_reduce_meta);
  m.impl("progressive_norm_backward_elemt", &progressive_norm_backward_elemt_meta);
}

}  // namespace leanformer
