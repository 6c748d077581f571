// Argument checks of the packed_linear family (packed_linear, packed_swiglu): x [..., K] float32
// or float64 on the CPU, and a weight prepacked into panels of kPanel = 32 output columns
// (python/leanformer/ops/packed_linear.py packs it). CPU only: on a GPU, cuBLAS reads the
// weight as it is, so there is no CUDA backend; the CPU and Meta kernels share these (written on
// symbolic sizes, csrc/checks.h).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace leanformer {

constexpr int64_t kPanel = 32;  // columns of W^T per panel; the layout does not depend on the ISA

// The op's x [..., K]: float32 or float64 on the CPU (or on meta: the Meta kernels trace CPU
// code, torch.compile's fake tensors of CPU tensors are meta tensors there). op prefixes every
// message.
inline void check_packed_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., K] with at least one dimension, got a scalar");
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble, op, ": x must be float32 or float64, got ", s);
  TORCH_CHECK(x.device().is_cpu() || x.device().is_meta(), op,
              ": x must be on the CPU (it is a CPU decoding kernel), got ", x.device());
}

// A packed weight [NP, ...] (its layout checked by the op) in x's dtype and on x's device, whose
// NP panels of 32 columns hold the op's N outputs (N is named n_name).
inline void check_packed_panels(const char* op, const at::Tensor& packed, const char* packed_name,
                                const at::Tensor& x, int64_t N, const char* n_name) {
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), op, ": ", packed_name, " must have the dtype of x (",
              x.scalar_type(), "), got ", packed.scalar_type());
  TORCH_CHECK(packed.device() == x.device(), op, ": ", packed_name, " is on ", packed.device(),
              " but x is on ", x.device());
  const c10::SymInt NP = packed.sym_size(0);
  TORCH_SYM_CHECK(((NP - 1) * kPanel).sym_lt(N) & (NP * kPanel).sym_ge(N), op, ": ", n_name, " = ", N,
                  " does not fit ", packed_name, "'s ", NP, " panels of 32 columns (it must be in (",
                  (NP - 1) * kPanel, ", ", NP * kPanel, "])");
}

// x [..., K]; packed_weight [ceil(N/32), K, 32]; bias [out_features].
inline void check_packed_linear_inputs(const at::Tensor& x, const at::Tensor& packed_weight,
                                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_packed_x("packed_linear", x);
  const c10::SymInt K = x.sym_size(-1);
  TORCH_CHECK(packed_weight.dim() == 3, "packed_linear: packed_weight must be [ceil(N/32), K, 32] with K = "
              "x.shape[-1] = ", K, " (see pack_linear_weight), got ", packed_weight.sym_sizes());
  TORCH_SYM_CHECK(packed_weight.sym_size(1).sym_eq(K) & packed_weight.sym_size(2).sym_eq(kPanel),
                  "packed_linear: packed_weight must be [ceil(N/32), K, 32] with K = x.shape[-1] = ", K,
                  " (see pack_linear_weight), got ", packed_weight.sym_sizes());
  check_packed_panels("packed_linear", packed_weight, "packed_weight", x, out_features, "out_features");
  check_vector(bias, "packed_linear: bias", out_features, "out_features", x, "x");
}

// x [..., K]; packed_gate_up [ceil(hidden/32), 2, K, 32]: gate and up panels side by side.
inline void check_packed_swiglu_inputs(const at::Tensor& x, const at::Tensor& packed_gate_up, int64_t hidden) {
  check_packed_x("packed_swiglu", x);
  const c10::SymInt K = x.sym_size(-1);
  TORCH_CHECK(packed_gate_up.dim() == 4, "packed_swiglu: packed_gate_up must be [ceil(hidden/32), 2, K, 32] "
              "with K = x.shape[-1] = ", K, " (see pack_swiglu_weight), got ", packed_gate_up.sym_sizes());
  TORCH_SYM_CHECK(packed_gate_up.sym_size(1).sym_eq(2) & packed_gate_up.sym_size(2).sym_eq(K) &
                      packed_gate_up.sym_size(3).sym_eq(kPanel),
                  "packed_swiglu: packed_gate_up must be [ceil(hidden/32), 2, K, 32] with K = x.shape[-1] = ", K,
                  " (see pack_swiglu_weight), got ", packed_gate_up.sym_sizes());
  check_packed_panels("packed_swiglu", packed_gate_up, "packed_gate_up", x, hidden, "hidden");
}

}  // namespace leanformer
