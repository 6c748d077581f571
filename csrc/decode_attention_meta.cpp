// Meta kernel of decode_attention: its checks (the same the CPU and CUDA kernels run), then the
// output [B, H * D] in qkv's dtype, no data; the caches are written in place and only checked.
// The dispatcher runs it for meta tensors, and FakeTensorMode (torch.compile, torch.export) for
// fake ones, with symbolic sizes where the shapes are dynamic. The values of lens (within the
// cache and the RoPE tables) need the data: the real kernels check them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "decode_attention_checks.h"

namespace leanformer {
namespace {

at::Tensor decode_attention_meta(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin,
                                 int64_t num_heads) {
  const DecodeAttentionSymShape s =
      check_decode_attention_inputs_sym(qkv, k_cache, v_cache, lens, cos, sin, num_heads);
  return at::empty_symint({s.B, s.H * s.D}, qkv.options());
}

at::Tensor decode_attention_tree_meta(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin,
                                      int64_t num_heads, const at::Tensor& parents) {
  const DecodeAttentionSymShape s =
      check_decode_attention_tree_inputs(qkv, k_cache, v_cache, lens, cos, sin, num_heads, parents);
  return at::empty_symint({s.B, qkv.sym_size(1), s.H * s.D}, qkv.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, Meta, m) {
  m.impl("decode_attention", &decode_attention_meta);
  m.impl("decode_attention_tree", &decode_attention_tree_meta);
}

}  // namespace leanformer
