// Argument checks of rms_norm: x [..., C] (float32, float16, bfloat16 or float64), weight [C] in
// x's dtype or float32 on x's device, eps >= 0 and finite. The CPU and Meta kernels share these
// (written on symbolic sizes, csrc/checks.h).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace leanformer {

inline void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_not_scalar(x, "rms_norm: x", "[..., C]");
  check_floating(x, "rms_norm: x");
  const auto xs = x.scalar_type(), ws = weight.scalar_type();
  TORCH_CHECK(ws == xs || ws == at::kFloat, "rms_norm: weight must be in x's dtype (", xs, ") or float32, got ", ws);
  check_same_device(weight, "rms_norm: weight", x, "x");
  const c10::SymInt C = x.sym_size(-1);
  TORCH_CHECK(weight.dim() == 1, "rms_norm: weight must be [C] = [", C, "] (C = x.shape[-1]), got ",
              weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(0).sym_eq(C), "rms_norm: weight must be [C] = [", C, "] (C = x.shape[-1]), got ",
                  weight.sym_sizes());
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "rms_norm: eps must be finite and >= 0, got ", eps);
}

}  // namespace leanformer
