// Argument checks of the RepBN ops, shared by every backend.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace leanformer {

struct RepBNShape {
  int64_t N, C;  // tokens (all leading dims), channels
};

inline void check_channel_vector(const at::Tensor& t, const char* name, int64_t C,
                                 at::ScalarType dtype, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, name, " must have shape [C] = [", C,
              "] (C = x.shape[-1]), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " for ", x.scalar_type(),
              " inputs, got ", t.scalar_type());
  check_same_device(t, name, x, "x");
}

// Parameters and running statistics: fp32, or fp64 for fp64 inputs.
inline at::ScalarType rep_batchnorm_param_dtype(const at::Tensor& x) {
  return accumulate_dtype(x.scalar_type());
}

// x [..., C] and the optional bool mask over its leading dims.
inline RepBNShape check_norm_input(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check_not_scalar(x, "x", "[..., C]");
  check_floating(x, "x");
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, x.dim() - 1),
                "mask must have the leading shape of x ", x.sizes().slice(0, x.dim() - 1),
                ", got ", mask->sizes());
    check_same_device(*mask, "mask", x, "x");
  }
  const int64_t C = x.size(-1);
  return {C == 0 ? 0 : x.numel() / C, C};
}

inline RepBNShape check_rep_batchnorm_common(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& alpha,
                                             const std::optional<at::Tensor>& mask) {
  const RepBNShape shape = check_norm_input(x, mask);
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(weight, "weight", shape.C, dtype, x);
  TORCH_CHECK(alpha.numel() == 1, "alpha must hold one value, got shape ", alpha.sizes());
  TORCH_CHECK(alpha.scalar_type() == dtype, "alpha must be ", dtype, ", got ", alpha.scalar_type());
  check_same_device(alpha, "alpha", x, "x");
  return shape;
}

inline RepBNShape check_rep_batchnorm_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& alpha,
                                             const at::Tensor& running_mean,
                                             const at::Tensor& running_var,
                                             const std::optional<at::Tensor>& mask) {
  const RepBNShape s = check_rep_batchnorm_common(x, weight, alpha, mask);
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(bias, "bias", s.C, dtype, x);
  check_channel_vector(running_mean, "running_mean", s.C, dtype, x);
  check_channel_vector(running_var, "running_var", s.C, dtype, x);
  return s;
}

inline RepBNShape check_progressive_norm_inputs(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& alpha,
    const at::Tensor& running_mean, const at::Tensor& running_var, double gamma,
    const std::optional<at::Tensor>& mask) {
  const RepBNShape s =
      check_rep_batchnorm_inputs(x, bn_weight, bn_bias, alpha, running_mean, running_var, mask);
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(ln_weight, "ln_weight", s.C, dtype, x);
  check_channel_vector(ln_bias, "ln_bias", s.C, dtype, x);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  return s;
}

inline void check_grad_and_statistics(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& invstd, int64_t C) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "grad_y must match x in shape, dtype and device (", x.sizes(), ", ",
              x.scalar_type(), "), got ", grad_y.sizes(), ", ", grad_y.scalar_type());
  const auto dtype = rep_batchnorm_param_dtype(x);
  check_channel_vector(mean, "mean", C, dtype, x);
  check_channel_vector(invstd, "invstd", C, dtype, x);
}

inline RepBNShape check_rep_batchnorm_backward_inputs(const at::Tensor& grad_y,
                                                      const at::Tensor& x,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& alpha,
                                                      const at::Tensor& mean,
                                                      const at::Tensor& invstd,
                                                      const std::optional<at::Tensor>& mask) {
  const RepBNShape s = check_rep_batchnorm_common(x, weight, alpha, mask);
  check_grad_and_statistics(grad_y, x, mean, invstd, s.C);
  return s;
}

// The backward column sums: grad_y like x, the BN statistics of the forward.
inline RepBNShape check_norm_backward_reduce_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    double gamma) {
  const RepBNShape s = check_norm_input(x, std::nullopt);
  check_grad_and_statistics(grad_y, x, mean, invstd, s.C);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  return s;
}

// dx from the column means of the whole (distributed) batch: the backward's inputs, ln_weight
// when gamma != 0, and mean_dy, mean_dy_xhat fp64 [C].
inline RepBNShape check_norm_backward_elemt_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat,
    double gamma, const std::optional<at::Tensor>& mask) {
  const RepBNShape s =
      check_rep_batchnorm_backward_inputs(grad_y, x, bn_weight, alpha, mean, invstd, mask);
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(gamma == 0.0 || ln_weight, "ln_weight is required when gamma != 0 (got gamma ",
              gamma, ")");
  if (ln_weight) check_channel_vector(*ln_weight, "ln_weight", s.C, rep_batchnorm_param_dtype(x), x);
  check_channel_vector(mean_dy, "mean_dy", s.C, at::kDouble, x);
  check_channel_vector(mean_dy_xhat, "mean_dy_xhat", s.C, at::kDouble, x);
  return s;
}

}  // namespace leanformer
