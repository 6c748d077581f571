// Argument checks shared by the CPU, CUDA and Meta implementations of simplified linear
// attention, so a direct torch.ops call gets the same clear error as the Python API, and
// torch.compile refuses what eager refuses. Written on symbolic sizes (csrc/checks.h): the
// *_sym checks return the shape as SymInts (the Meta kernels allocate with them), the plain
// ones return it as integers for the kernels.
#pragma once

#include "checks.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

namespace leanformer {

struct SlaShape {
  int64_t B, T, H, Dk, Dv;
};

struct SlaSymShape {
  c10::SymInt B, T, H, Dk, Dv;
  SlaShape concrete() const {
    return {B.expect_int(), T.expect_int(), H.expect_int(), Dk.expect_int(), Dv.expect_int()};
  }
};

// States (S, z) accumulate in fp32, or fp64 when the inputs are fp64 (gradcheck).
inline at::ScalarType sla_state_dtype(at::ScalarType input) { return accumulate_dtype(input); }

inline void check_state(const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& z,
                        const SlaSymShape& s, const at::Tensor& q, const char* S_name,
                        const char* z_name) {
  TORCH_CHECK(S.has_value() == z.has_value(), S_name, " and ", z_name,
              " must be given together (the state is the pair (S, z))");
  if (!S.has_value()) return;
  check_linear_attention_state(*S, S_name, *z, z_name, s.B, s.H, s.Dk, s.Dv, q);
}

// q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; optional state (S [B, H, Dk, Dv], z [B, H, Dk]).
inline SlaSymShape check_sla_inputs_sym(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const std::optional<at::Tensor>& initial_S,
                                        const std::optional<at::Tensor>& initial_z, bool causal) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got shape ", q.sym_sizes());
  TORCH_CHECK(k.dim() == 4, "k must be [B, T, H, Dk], got shape ", k.sym_sizes());
  TORCH_CHECK(v.dim() == 4, "v must be [B, T, H, Dv], got shape ", v.sym_sizes());
  SlaSymShape s{q.sym_size(0), q.sym_size(1), q.sym_size(2), q.sym_size(3), v.sym_size(3)};
  TORCH_SYM_CHECK(sym_sizes_eq(k.sym_sizes().slice(0, 3), q.sym_sizes().slice(0, 3)),
                  "k must match q in [B, T, H] = [", s.B, ", ", s.T, ", ", s.H, "], got ", k.sym_sizes());
  TORCH_SYM_CHECK(k.sym_size(3).sym_eq(s.Dk), "k must have the same head dim Dk as q (", s.Dk, "), got ",
                  k.sym_size(3));
  TORCH_SYM_CHECK(sym_sizes_eq(v.sym_sizes().slice(0, 3), q.sym_sizes().slice(0, 3)),
                  "v must match q in [B, T, H] = [", s.B, ", ", s.T, ", ", s.H, "], got ", v.sym_sizes());
  check_floating(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  TORCH_CHECK(causal || !initial_S.has_value(),
              "initial_state is only supported with causal=True");
  check_state(initial_S, initial_z, s, q, "initial_state S", "initial_state z");
  return s;
}

inline SlaShape check_sla_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& initial_S,
                                 const std::optional<at::Tensor>& initial_z, bool causal) {
  return check_sla_inputs_sym(q, k, v, initial_S, initial_z, causal).concrete();
}

// sla_backward: the forward's checks; o and grad_o [B, T, H, Dv] like q; the gradients of the
// final state (grad_S, grad_z) given together or not at all, in the state's shape and dtype.
inline SlaSymShape check_sla_backward_inputs_sym(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal) {
  const SlaSymShape s = check_sla_inputs_sym(q, k, v, initial_S, initial_z, causal);
  const c10::SymInt want_o[4] = {s.B, s.T, s.H, s.Dv};
  TORCH_SYM_CHECK(sym_sizes_eq(o.sym_sizes(), want_o), "o must be [B, T, H, Dv] = [", s.B, ", ", s.T, ", ",
                  s.H, ", ", s.Dv, "], got ", o.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(grad_o.sym_sizes(), o.sym_sizes()), "grad_o must have the shape of o ",
                  o.sym_sizes(), ", got ", grad_o.sym_sizes());
  check_like(o, "o", q, "q");
  check_like(grad_o, "grad_o", q, "q");
  check_state(grad_S, grad_z, s, q, "grad_S", "grad_z");
  return s;
}

inline SlaShape check_sla_backward_inputs(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal) {
  return check_sla_backward_inputs_sym(grad_o, grad_S, grad_z, q, k, v, o, initial_S, initial_z, causal)
      .concrete();
}

// Decode step: q, k [B, H, Dk], v [B, H, Dv], S [B, H, Dk, Dv], z [B, H, Dk].
inline SlaSymShape check_sla_step_inputs_sym(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& S,
                                             const at::Tensor& z) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, Dk] for a decode step, got shape ", q.sym_sizes());
  TORCH_CHECK(k.dim() == 3, "k must be [B, H, Dk] for a decode step, got shape ", k.sym_sizes());
  TORCH_CHECK(v.dim() == 3, "v must be [B, H, Dv] for a decode step, got shape ", v.sym_sizes());
  SlaSymShape s{q.sym_size(0), 1, q.sym_size(1), q.sym_size(2), v.sym_size(2)};
  TORCH_SYM_CHECK(sym_sizes_eq(k.sym_sizes(), q.sym_sizes()), "k must have the shape of q ", q.sym_sizes(),
                  ", got ", k.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(v.sym_sizes().slice(0, 2), q.sym_sizes().slice(0, 2)),
                  "v must match q in [B, H] = [", s.B, ", ", s.H, "], got ", v.sym_sizes());
  check_floating(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_state(S, z, s, q, "state S", "state z");
  return s;
}

inline SlaShape check_sla_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& S, const at::Tensor& z) {
  return check_sla_step_inputs_sym(q, k, v, S, z).concrete();
}

}  // namespace leanformer
