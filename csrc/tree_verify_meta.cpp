// Meta kernels of the tree_verify family: the family's checks (the same the CPU and CUDA kernels
// run), then outputs of the right shape, dtype and strides and no data; compact_kv_cache works in
// place and only checks. The dispatcher runs them for meta tensors, and FakeTensorMode
// (torch.compile, torch.export) for fake ones, with symbolic sizes where the shapes are dynamic.
// The value checks (parents forming a tree, token ids within the vocabulary, accepted paths
// ascending, cache_lens within the cache) need the data: the real kernels run them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "tree_verify_checks.h"

namespace leanformer {
namespace {

using Verification = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// (accepted [B, T], num_accepted [B], bonus [B]) int64.
Verification verification_outputs(const TreeVerifySymShape& s, const at::Tensor& tree_tokens) {
  const auto opts = tree_tokens.options();
  return {at::empty_symint({s.B, s.T}, opts), at::empty_symint({s.B}, opts), at::empty_symint({s.B}, opts)};
}

Verification verify_tree_greedy_meta(const at::Tensor& logits, const at::Tensor& tree_tokens,
                                     const at::Tensor& parents) {
  return verification_outputs(check_tree_verify_inputs_sym(logits, "logits", tree_tokens, parents), tree_tokens);
}

Verification verify_tree_sampling_meta(const at::Tensor& probs, const at::Tensor& tree_tokens,
                                       const at::Tensor& parents, const at::Tensor& uniforms) {
  return verification_outputs(check_verify_tree_sampling_inputs_sym(probs, tree_tokens, parents, uniforms),
                              tree_tokens);
}

void compact_kv_cache_meta(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_lens,
                           const at::Tensor& accepted, const at::Tensor& num_accepted) {
  check_compact_kv_cache_inputs_sym(k_cache, v_cache, cache_lens, accepted, num_accepted);
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("verify_tree_greedy", &verify_tree_greedy_meta);
  m.impl("verify_tree_sampling", &verify_tree_sampling_meta);
  m.impl("compact_kv_cache", &compact_kv_cache_meta);
}

}  // namespace leanformer
