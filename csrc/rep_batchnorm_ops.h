// The four RepBN ops on top of a backend's two cores, shared by every backend: each checks
// its arguments, packs them into NormArgs and calls norm_forward / norm_backward, which
// compute gamma * LayerNorm(x) + (1 - gamma) * RepBN(x) (RepBN alone: gamma = 0, no LN
// tensors) and its gradients. A backend registers them with register_norm_ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "rep_batchnorm_checks.h"

namespace leanformer {

struct NormArgs {
  const at::Tensor& x;
  const at::Tensor* ln_weight;  // null for RepBN alone
  const at::Tensor* ln_bias;
  const at::Tensor& bn_weight;
  const at::Tensor& bn_bias;
  const at::Tensor& alpha;
  const at::Tensor& running_mean;
  const at::Tensor& running_var;
  double gamma;
  bool training;
  double ln_eps, bn_eps;
  const std::optional<at::Tensor>& mask;
};

// Returns (y, mean, invstd).
using NormForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const NormArgs& args,
                                                                           int64_t N, int64_t C);
// Returns (dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha); the LN ones undefined for RepBN alone.
using NormBackwardFn = std::vector<at::Tensor> (*)(const at::Tensor& grad_y, const NormArgs& args,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& invstd, int64_t N, int64_t C);

template <NormForwardFn norm_forward, NormBackwardFn norm_backward>
struct NormOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> rep_batchnorm(
      const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
      const at::Tensor& alpha, const at::Tensor& running_mean, const at::Tensor& running_var,
      bool training, double eps, const std::optional<at::Tensor>& mask) {
    const RepBNShape s = check_rep_batchnorm_inputs(x, weight, bias, alpha, running_mean,
                                                    running_var, training, mask);
    return norm_forward({x, nullptr, nullptr, weight, bias, alpha, running_mean, running_var,
                         0.0, training, 0.0, eps, mask},
                        s.N, s.C);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rep_batchnorm_backward(
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
      const at::Tensor& alpha, const at::Tensor& mean, const at::Tensor& invstd, bool training,
      const std::optional<at::Tensor>& mask) {
    const RepBNShape s = check_rep_batchnorm_backward_inputs(grad_y, x, weight, alpha, mean,
                                                             invstd, mask);
    const at::Tensor none;
    auto r = norm_backward(grad_y, {x, nullptr, nullptr, weight, none, alpha, none, none, 0.0,
                                    training, 0.0, 0.0, mask},
                           mean, invstd, s.N, s.C);
    return {r[0], r[3], r[4], r[5]};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> progressive_norm(
      const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
      const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& alpha,
      const at::Tensor& running_mean, const at::Tensor& running_var, double gamma,
      bool training, double ln_eps, double bn_eps, const std::optional<at::Tensor>& mask) {
    const RepBNShape s = check_progressive_norm_inputs(
        x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean, running_var, gamma, training,
        mask);
    return norm_forward({x, &ln_weight, &ln_bias, bn_weight, bn_bias, alpha, running_mean,
                         running_var, gamma, training, ln_eps, bn_eps, mask},
                        s.N, s.C);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  progressive_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                            const at::Tensor& ln_weight, const at::Tensor& bn_weight,
                            const at::Tensor& alpha, const at::Tensor& mean,
                            const at::Tensor& invstd, double gamma, bool training, double ln_eps,
                            const std::optional<at::Tensor>& mask) {
    const RepBNShape s = check_progressive_norm_backward_inputs(grad_y, x, ln_weight, bn_weight, alpha,
                                                                mean, invstd, mask);
    const at::Tensor none;
    auto r = norm_backward(grad_y, {x, &ln_weight, &none, bn_weight, none, alpha, none, none,
                                    gamma, training, ln_eps, 0.0, mask},
                           mean, invstd, s.N, s.C);
    return {r[0], r[1], r[2], r[3], r[4], r[5]};
  }
};

// In a backend's TORCH_LIBRARY_IMPL block: register_norm_ops<&norm_forward, &norm_backward>(m).
template <NormForwardFn norm_forward, NormBackwardFn norm_backward>
void register_norm_ops(torch::Library& m) {
  using Ops = NormOps<norm_forward, norm_backward>;
  m.impl("rep_batchnorm", &Ops::rep_batchnorm);
  m.impl("rep_batchnorm_backward", &Ops::rep_batchnorm_backward);
  m.impl("progressive_norm", &Ops::progressive_norm);
  m.impl("progressive_norm_backward", &Ops::progressive_norm_backward);
}

}  // namespace leanformer
