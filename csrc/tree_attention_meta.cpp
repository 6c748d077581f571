// Meta kernels of the tree_attention family: the family's checks (the same the CPU and CUDA
// kernels run), then an output of the right shape, dtype and strides and no data. The
// dispatcher runs them for meta tensors, and FakeTensorMode (torch.compile, torch.export) for
// fake ones, with symbolic sizes where the shapes are dynamic. The value checks (cache_lens
// within the cache, the mask's diagonal) need the data: the real kernels run them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "tree_attention_checks.h"

namespace leanformer {
namespace {

at::Tensor tree_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_lens, const at::Tensor& k_tree, const at::Tensor& v_tree,
                               const at::Tensor& tree_mask, std::optional<double> scale) {
  const TreeAttentionSymShape s =
      check_tree_attention_inputs_sym(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask);
  return at::empty_symint({s.B, s.T, s.Hq, s.Dv}, q.options());
}

at::Tensor tree_linear_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& S, const at::Tensor& z, const at::Tensor& tree_mask,
                                      double eps) {
  const TreeLinearSymShape s = check_tree_linear_attention_inputs_sym(q, k, v, S, z, tree_mask);
  return at::empty_symint({s.B, s.T, s.H, s.Dv}, q.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("tree_attention", &tree_attention_meta);
  m.impl("tree_linear_attention", &tree_linear_attention_meta);
}

}  // namespace leanformer
