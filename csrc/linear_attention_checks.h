// Argument checks shared by the CPU and CUDA implementations of simplified linear
// attention, so a direct torch.ops call gets the same clear error as the Python API.
#pragma once

#include "checks.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

namespace leanformer {

struct SlaShape {
  int64_t B, T, H, Dk, Dv;
};

// States (S, z) accumulate in fp32, or fp64 when the inputs are fp64 (gradcheck).
inline at::ScalarType sla_state_dtype(at::ScalarType input) { return accumulate_dtype(input); }

inline void check_state(const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& z,
                        const SlaShape& s, const at::Tensor& q, const char* S_name,
                        const char* z_name) {
  TORCH_CHECK(S.has_value() == z.has_value(), S_name, " and ", z_name,
              " must be given together (the state is the pair (S, z))");
  if (!S.has_value()) return;
  check_linear_attention_state(*S, S_name, *z, z_name, s.B, s.H, s.Dk, s.Dv, q);
}

// q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; optional state (S [B, H, Dk, Dv], z [B, H, Dk]).
inline SlaShape check_sla_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& initial_S,
                                 const std::optional<at::Tensor>& initial_z, bool causal) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be [B, T, H, Dk], got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must be [B, T, H, Dv], got shape ", v.sizes());
  SlaShape s{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && k.size(1) == s.T && k.size(2) == s.H,
              "k must match q in [B, T, H] = [", s.B, ", ", s.T, ", ", s.H, "], got ", k.sizes());
  TORCH_CHECK(k.size(3) == s.Dk, "k must have the same head dim Dk as q (", s.Dk, "), got ",
              k.size(3));
  TORCH_CHECK(v.size(0) == s.B && v.size(1) == s.T && v.size(2) == s.H,
              "v must match q in [B, T, H] = [", s.B, ", ", s.T, ", ", s.H, "], got ", v.sizes());
  check_floating(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  TORCH_CHECK(causal || !initial_S.has_value(),
              "initial_state is only supported with causal=True");
  check_state(initial_S, initial_z, s, q, "initial_state S", "initial_state z");
  return s;
}

inline void check_sla_grad_output(const at::Tensor& grad_o, const at::Tensor& o,
                                  const SlaShape& s, const at::Tensor& q) {
  TORCH_CHECK(o.dim() == 4 && o.size(0) == s.B && o.size(1) == s.T && o.size(2) == s.H &&
                  o.size(3) == s.Dv,
              "o must be [B, T, H, Dv] = [", s.B, ", ", s.T, ", ", s.H, ", ", s.Dv, "], got ",
              o.sizes());
  TORCH_CHECK(grad_o.sizes() == o.sizes(), "grad_o must have the shape of o ", o.sizes(),
              ", got ", grad_o.sizes());
  check_like(o, "o", q, "q");
  check_like(grad_o, "grad_o", q, "q");
}

// Decode step: q, k [B, H, Dk], v [B, H, Dv], S [B, H, Dk, Dv], z [B, H, Dk].
inline SlaShape check_sla_step_inputs(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& S,
                                      const at::Tensor& z) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, Dk] for a decode step, got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must be [B, H, Dk] for a decode step, got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "v must be [B, H, Dv] for a decode step, got shape ", v.sizes());
  SlaShape s{q.size(0), 1, q.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == s.B && v.size(1) == s.H, "v must match q in [B, H] = [", s.B, ", ",
              s.H, "], got ", v.sizes());
  check_floating(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_state(S, z, s, q, "state S", "state z");
  return s;
}

}  // namespace leanformer
