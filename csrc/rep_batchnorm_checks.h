// Argument checks of the RepBN ops, shared by every backend (CPU, CUDA, Meta), on symbolic sizes
// (csrc/checks.h).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace leanformer {

// The kernels' view of x [..., C]: N tokens (all leading dims; 0 when C = 0), C channels.
struct RepBNShape {
  int64_t N, C;
};

inline RepBNShape rep_batchnorm_shape(const at::Tensor& x) {
  const int64_t C = x.size(-1);
  return {C == 0 ? 0 : x.numel() / C, C};
}

inline void check_channel_vector(const at::Tensor& t, const char* name, const c10::SymInt& C,
                                 at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1, name, " must have shape [C] = [", C, "] (C = x.shape[-1]), got ", t.sym_sizes());
  TORCH_SYM_CHECK(t.sym_size(0).sym_eq(C), name, " must have shape [C] = [", C, "] (C = x.shape[-1]), got ",
                  t.sym_sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " for ", x.scalar_type(),
              " inputs, got ", t.scalar_type());
  check_same_device(t, name, x, "x");
}

// Parameters and running statistics: fp32, or fp64 for fp64 inputs.
inline at::ScalarType rep_batchnorm_param_dtype(const at::Tensor& x) {
  return accumulate_dtype(x.scalar_type());
}

// Training estimates the statistics from the tokens of x: more than one is needed (more than one
// unmasked one: the kernels count the mask, a value check).
inline void check_training_tokens(const at::Tensor& x, bool training) {
  if (!training) return;
  const c10::SymInt N = leading_numel(x);
  TORCH_SYM_CHECK(N.sym_gt(1), "batch norm: training needs more than one token per channel to estimate ",
                  "statistics, got ", N, " (x.shape[:-1] = ", leading_sizes(x), ")");
}

// The BN tensors' names in the messages, as the op's schema names them: RepBN's weight, bias,
// mean and invstd are PRepBN's bn_weight, bn_bias, bn_mean and bn_invstd.
struct BNNames {
  const char *weight, *bias, *mean, *invstd;
};
constexpr BNNames kRepBNNames{"weight", "bias", "mean", "invstd"};
constexpr BNNames kPRepBNNames{"bn_weight", "bn_bias", "bn_mean", "bn_invstd"};

inline void check_gamma(double gamma) {
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
}

// The *_sym checks are the rule (symbolic sizes: the Meta kernels call them too); the plain ones
// run them and return the kernels' RepBNShape.

// x [..., C] and the optional bool mask over its leading dims.
inline void check_norm_input_sym(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check_not_scalar(x, "x", "[..., C]");
  check_floating(x, "x");
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_SYM_CHECK(sym_sizes_eq(mask->sym_sizes(), leading_sizes(x)), "mask must have the leading shape of x ",
                    leading_sizes(x), ", got ", mask->sym_sizes());
    check_same_device(*mask, "mask", x, "x");
  }
}

inline RepBNShape check_norm_input(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check_norm_input_sym(x, mask);
  return rep_batchnorm_shape(x);
}

inline void check_rep_batchnorm_common_sym(const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& alpha, const std::optional<at::Tensor>& mask,
                                           const BNNames& names) {
  check_norm_input_sym(x, mask);
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(weight, names.weight, x.sym_size(-1), dtype, x);
  TORCH_SYM_CHECK(alpha.sym_numel().sym_eq(1), "alpha must hold one value, got shape ", alpha.sym_sizes());
  TORCH_CHECK(alpha.scalar_type() == dtype, "alpha must be ", dtype, ", got ", alpha.scalar_type());
  check_same_device(alpha, "alpha", x, "x");
}

inline void check_rep_batchnorm_inputs_sym(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           const at::Tensor& alpha, const at::Tensor& running_mean,
                                           const at::Tensor& running_var, bool training,
                                           const std::optional<at::Tensor>& mask,
                                           const BNNames& names = kRepBNNames) {
  check_rep_batchnorm_common_sym(x, weight, alpha, mask, names);
  check_training_tokens(x, training);
  const auto dtype = rep_batchnorm_param_dtype(x);
  const c10::SymInt C = x.sym_size(-1);
  check_channel_vector(bias, names.bias, C, dtype, x);
  check_channel_vector(running_mean, "running_mean", C, dtype, x);
  check_channel_vector(running_var, "running_var", C, dtype, x);
}

inline RepBNShape check_rep_batchnorm_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& alpha,
                                             const at::Tensor& running_mean, const at::Tensor& running_var,
                                             bool training, const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_inputs_sym(x, weight, bias, alpha, running_mean, running_var, training, mask);
  return rep_batchnorm_shape(x);
}

inline void check_progressive_norm_inputs_sym(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& alpha,
    const at::Tensor& running_mean, const at::Tensor& running_var, double gamma, bool training,
    const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_inputs_sym(x, bn_weight, bn_bias, alpha, running_mean, running_var, training, mask,
                                 kPRepBNNames);
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(ln_weight, "ln_weight", x.sym_size(-1), dtype, x);
  check_channel_vector(ln_bias, "ln_bias", x.sym_size(-1), dtype, x);
  check_gamma(gamma);
}

inline RepBNShape check_progressive_norm_inputs(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& alpha,
    const at::Tensor& running_mean, const at::Tensor& running_var, double gamma, bool training,
    const std::optional<at::Tensor>& mask) {
  check_progressive_norm_inputs_sym(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean,
                                    running_var, gamma, training, mask);
  return rep_batchnorm_shape(x);
}

inline void check_grad_and_statistics(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& invstd, const BNNames& names) {
  TORCH_SYM_CHECK(sym_sizes_eq(grad_y.sym_sizes(), x.sym_sizes()), "grad_y must have the shape of x ",
                  x.sym_sizes(), ", got ", grad_y.sym_sizes());
  check_like(grad_y, "grad_y", x, "x");
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(mean, names.mean, x.sym_size(-1), dtype, x);
  check_channel_vector(invstd, names.invstd, x.sym_size(-1), dtype, x);
}

inline void check_rep_batchnorm_backward_inputs_sym(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& alpha,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& mask,
                                                    const BNNames& names = kRepBNNames) {
  check_rep_batchnorm_common_sym(x, weight, alpha, mask, names);
  check_grad_and_statistics(grad_y, x, mean, invstd, names);
}

inline RepBNShape check_rep_batchnorm_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& weight, const at::Tensor& alpha,
                                                      const at::Tensor& mean, const at::Tensor& invstd,
                                                      const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_backward_inputs_sym(grad_y, x, weight, alpha, mean, invstd, mask);
  return rep_batchnorm_shape(x);
}

// progressive_norm_backward: RepBN's backward arguments plus ln_weight [C].
inline void check_progressive_norm_backward_inputs_sym(const at::Tensor& grad_y, const at::Tensor& x,
                                                       const at::Tensor& ln_weight, const at::Tensor& bn_weight,
                                                       const at::Tensor& alpha, const at::Tensor& mean,
                                                       const at::Tensor& invstd,
                                                       const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_backward_inputs_sym(grad_y, x, bn_weight, alpha, mean, invstd, mask, kPRepBNNames);
  check_channel_vector(ln_weight, "ln_weight", x.sym_size(-1), rep_batchnorm_param_dtype(x), x);
}

inline RepBNShape check_progressive_norm_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& ln_weight, const at::Tensor& bn_weight,
                                                         const at::Tensor& alpha, const at::Tensor& mean,
                                                         const at::Tensor& invstd,
                                                         const std::optional<at::Tensor>& mask) {
  check_progressive_norm_backward_inputs_sym(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd, mask);
  return rep_batchnorm_shape(x);
}

// The backward column sums: grad_y like x, the BN statistics of the forward.
inline void check_norm_backward_reduce_inputs_sym(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& mean, const at::Tensor& invstd,
                                                  double gamma) {
  check_norm_input_sym(x, std::nullopt);
  check_grad_and_statistics(grad_y, x, mean, invstd, kPRepBNNames);
  check_gamma(gamma);
}

inline RepBNShape check_norm_backward_reduce_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    double gamma) {
  check_norm_backward_reduce_inputs_sym(grad_y, x, mean, invstd, gamma);
  return rep_batchnorm_shape(x);
}

// dx from the column means of the whole (distributed) batch: the backward's inputs, ln_weight
// when gamma != 0, and mean_dy, mean_dy_xhat fp64 [C].
inline void check_norm_backward_elemt_inputs_sym(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat,
    double gamma, const std::optional<at::Tensor>& mask) {
  check_rep_batchnorm_backward_inputs_sym(grad_y, x, bn_weight, alpha, mean, invstd, mask, kPRepBNNames);
  check_gamma(gamma);
  TORCH_CHECK(gamma == 0.0 || ln_weight, "ln_weight is required when gamma != 0 (got gamma ",
              gamma, ")");
  const c10::SymInt C = x.sym_size(-1);
  if (ln_weight) check_channel_vector(*ln_weight, "ln_weight", C, rep_batchnorm_param_dtype(x), x);
  check_channel_vector(mean_dy, "mean_dy", C, at::kDouble, x);
  check_channel_vector(mean_dy_xhat, "mean_dy_xhat", C, at::kDouble, x);
}

inline RepBNShape check_norm_backward_elemt_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat,
    double gamma, const std::optional<at::Tensor>& mask) {
  check_norm_backward_elemt_inputs_sym(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd, mean_dy,
                                       mean_dy_xhat, gamma, mask);
  return rep_batchnorm_shape(x);
}

}  // namespace leanformer
