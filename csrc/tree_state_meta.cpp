// Meta kernels of the tree_state family: the family's checks (the same the CPU and CUDA kernels
// run), then tree_dwconv's output of the right shape, dtype and strides and no data;
// sla_tree_commit works in place and only checks. The dispatcher runs them for meta tensors, and
// FakeTensorMode (torch.compile, torch.export) for fake ones, with symbolic sizes where the
// shapes are dynamic. The value checks (parents forming a tree, the path within every layer's
// tree) need the data: the real kernels run them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "tree_state_checks.h"

namespace leanformer {
namespace {

void sla_tree_commit_meta(at::TensorList S, at::TensorList z, at::TensorList conv_tail, at::TensorList k,
                          at::TensorList v, const at::Tensor& path, const at::Tensor& num_accepted) {
  check_sla_tree_commit_inputs(S, z, conv_tail, k, v, path, num_accepted);
}

at::Tensor tree_dwconv_meta(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_tree_dwconv_inputs(v, conv_tail, parents, weight, bias);
  return at::empty_symint(v.sym_sizes(), v.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("sla_tree_commit", &sla_tree_commit_meta);
  m.impl("tree_dwconv", &tree_dwconv_meta);
}

}  // namespace leanformer
