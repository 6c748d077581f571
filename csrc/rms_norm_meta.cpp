// Meta kernel of rms_norm: the checks the CPU kernel runs, then an output of x's shape and dtype
// and no data (torch.compile / export trace it on fake tensors).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "rms_norm_checks.h"

namespace leanformer {
namespace {

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight, eps);
  return at::empty_symint(x.sym_sizes(), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) { m.impl("rms_norm", &rms_norm_meta); }

}  // namespace leanformer
