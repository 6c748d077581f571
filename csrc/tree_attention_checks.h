// Argument checks of the tree_attention family (tree_attention: softmax attention of a token
// tree over a KV cache; tree_linear_attention: SLAB's linear attention of a tree over a prefix
// state), shared by the CPU, CUDA and Meta backends. Shape, dtype and device checks read no tensor
// data; the value checks (cache_lens within the cache, the mask's diagonal) are per-element
// helpers the kernels call on the values they read anyway (csrc/checks.h has the shared ones):
// real kernels only, never on meta or fake tensors.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {

// Dimensions of tree_attention: q [B, T, Hq, D], caches [B, L_max, Hkv, D|Dv].
struct TreeAttentionShape {
  int64_t B, T, Hq, Hkv, D, Dv, L_max;
};

struct TreeAttentionSymShape {
  c10::SymInt B, T, Hq, Hkv, D, Dv, L_max;
  TreeAttentionShape concrete() const {
    return {B.expect_int(), T.expect_int(),  Hq.expect_int(),   Hkv.expect_int(),
            D.expect_int(), Dv.expect_int(), L_max.expect_int()};
  }
};

// Dimensions of tree_linear_attention: q, k [B, T, H, Dk], v [B, T, H, Dv].
struct TreeLinearShape {
  int64_t B, T, H, Dk, Dv;
};

struct TreeLinearSymShape {
  c10::SymInt B, T, H, Dk, Dv;
  TreeLinearShape concrete() const {
    return {B.expect_int(), T.expect_int(), H.expect_int(), Dk.expect_int(), Dv.expect_int()};
  }
};

// The *_sym checks are the rule, on symbolic sizes (csrc/checks.h; the Meta kernels call them);
// the plain ones run them and return the kernels' integer shape.
inline TreeAttentionSymShape check_tree_attention_inputs_sym(const at::Tensor& q, const at::Tensor& k_cache,
                                                             const at::Tensor& v_cache,
                                                             const at::Tensor& cache_lens,
                                                             const at::Tensor& k_tree, const at::Tensor& v_tree,
                                                             const at::Tensor& tree_mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, Hq, D], got shape ", q.sym_sizes());
  check_floating(q, "q");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [B, L_max, Hkv, D], got shape ", k_cache.sym_sizes());
  TORCH_CHECK(v_cache.dim() == 4, "v_cache must be [B, L_max, Hkv, Dv], got shape ", v_cache.sym_sizes());
  TreeAttentionSymShape s{q.sym_size(0),       q.sym_size(1),       q.sym_size(2),      k_cache.sym_size(2),
                          q.sym_size(3),       v_cache.sym_size(3), k_cache.sym_size(1)};
  check_bthd(k_cache, "k_cache", "[B, L_max, Hkv, D]", s.B, std::nullopt, std::nullopt, s.D);
  // Two checks: the remainder is only defined for Hkv > 0.
  TORCH_SYM_CHECK(s.Hkv.sym_gt(0), "the query heads Hq = ", s.Hq,
                  " (q.shape[2]) must be a multiple of the key/value heads Hkv = ", s.Hkv, " (k_cache.shape[2])");
  TORCH_SYM_CHECK((s.Hq % s.Hkv).sym_eq(0), "the query heads Hq = ", s.Hq,
                  " (q.shape[2]) must be a multiple of the key/value heads Hkv = ", s.Hkv, " (k_cache.shape[2])");
  check_bthd(v_cache, "v_cache", "[B, L_max, Hkv, Dv]", s.B, s.L_max, s.Hkv, s.Dv);
  check_bthd(k_tree, "k_tree", "[B, T, Hkv, D]", s.B, s.T, s.Hkv, s.D);
  check_bthd(v_tree, "v_tree", "[B, T, Hkv, Dv]", s.B, s.T, s.Hkv, s.Dv);
  check_like(k_cache, "k_cache", q, "q");
  check_like(v_cache, "v_cache", q, "q");
  check_like(k_tree, "k_tree", q, "q");
  check_like(v_tree, "v_tree", q, "q");
  check_cache_lens_shape(cache_lens, s.B, q, "q");
  check_tree_mask(tree_mask, s.B, s.T, q, "q");
  return s;
}

inline TreeAttentionShape check_tree_attention_inputs(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                      const at::Tensor& k_tree, const at::Tensor& v_tree,
                                                      const at::Tensor& tree_mask) {
  return check_tree_attention_inputs_sym(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask).concrete();
}

// The prefix state (S, z) of linear attention, as sla_forward's final state: fp32 (fp64 for fp64
// inputs, gradcheck).
inline TreeLinearSymShape check_tree_linear_attention_inputs_sym(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& S,
                                                                 const at::Tensor& z, const at::Tensor& tree_mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got shape ", q.sym_sizes());
  check_floating(q, "q");
  TORCH_CHECK(v.dim() == 4, "v must be [B, T, H, Dv], got shape ", v.sym_sizes());
  TreeLinearSymShape s{q.sym_size(0), q.sym_size(1), q.sym_size(2), q.sym_size(3), v.sym_size(3)};
  check_bthd(k, "k", "[B, T, H, Dk]", s.B, s.T, s.H, s.Dk);
  check_bthd(v, "v", "[B, T, H, Dv]", s.B, s.T, s.H, s.Dv);
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_linear_attention_state(S, "S", z, "z", s.B, s.H, s.Dk, s.Dv, q);
  check_tree_mask(tree_mask, s.B, s.T, q, "q");
  return s;
}

inline TreeLinearShape check_tree_linear_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& S,
                                                          const at::Tensor& z, const at::Tensor& tree_mask) {
  return check_tree_linear_attention_inputs_sym(q, k, v, S, z, tree_mask).concrete();
}

// A node sees itself: without the diagonal a node of an empty prefix would attend to nothing.
inline void check_tree_mask_diagonal(bool diag, int64_t b, int64_t i) {
  TORCH_CHECK(diag, "tree_mask[", b, ", ", i, ", ", i, "] must be true (a node sees itself)");
}

}  // namespace leanformer
