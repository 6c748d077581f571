// Meta kernels of simplified linear attention: the family's checks (the same the CPU and CUDA
// kernels run), then outputs of the right shape, dtype and strides and no data. The dispatcher
// runs them for meta tensors, and FakeTensorMode (torch.compile, torch.export) for fake ones,
// with symbolic sizes where the shapes are dynamic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "linear_attention_checks.h"

namespace leanformer {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal, double eps) {
  const SlaSymShape s = check_sla_inputs_sym(q, k, v, initial_S, initial_z, causal);
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  return {at::empty_symint({s.B, s.T, s.H, s.Dv}, q.options()),
          at::empty_symint({s.B, s.H, s.Dk, s.Dv}, state_opts), at::empty_symint({s.B, s.H, s.Dk}, state_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sla_backward_meta(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const std::optional<at::Tensor>& initial_S, const std::optional<at::Tensor>& initial_z, bool causal,
    double eps) {
  const SlaSymShape s =
      check_sla_backward_inputs_sym(grad_o, grad_S, grad_z, q, k, v, o, initial_S, initial_z, causal);
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options()), at::empty_symint({s.B, s.H, s.Dk, s.Dv}, state_opts),
          at::empty_symint({s.B, s.H, s.Dk}, state_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_step_meta(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& S,
                                                             const at::Tensor& z, double eps) {
  const SlaSymShape s = check_sla_step_inputs_sym(q, k, v, S, z);
  return {at::empty_symint({s.B, s.H, s.Dv}, q.options()), at::empty_symint(S.sym_sizes(), S.options()),
          at::empty_symint(z.sym_sizes(), z.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("sla_forward", &sla_forward_meta);
  m.impl("sla_backward", &sla_backward_meta);
  m.impl("sla_step", &sla_step_meta);
}

}  // namespace leanformer
