// Argument checks of the tree_verify family (verify_tree_greedy / verify_tree_sampling, and
// compact_kv_cache, which keeps the accepted path in the cache), shared by the CPU, CUDA and Meta
// backends. Shape, dtype and device checks read no tensor data; the value checks (parents
// forming a tree, token ids within the vocabulary, accepted paths ascending) are per-element
// helpers the kernels call on the values they read anyway: real kernels only, never on meta or
// fake tensors.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {

// Dimensions of the verification ops: logits/probs [B, T, V].
struct TreeVerifyShape {
  int64_t B, T, V;
  bool batched_parents;  // parents is [B, T] (else one [T] tree for every sequence)
};

struct TreeVerifySymShape {
  c10::SymInt B, T, V;
  bool batched_parents;
  TreeVerifyShape concrete() const { return {B.expect_int(), T.expect_int(), V.expect_int(), batched_parents}; }
};

// The *_sym checks are the rule, on symbolic sizes (csrc/checks.h; the Meta kernels call them);
// the plain ones run them and return the kernels' integer shape.

// logits or probs [B, T, V]; tree_tokens int64 [B, T] (-1 = padding); parents int64 [T] or
// [B, T] with the same T.
inline TreeVerifySymShape check_tree_verify_inputs_sym(const at::Tensor& scores, const char* scores_name,
                                                       const at::Tensor& tree_tokens, const at::Tensor& parents) {
  TORCH_CHECK(scores.dim() == 3, scores_name, " must be [B, T, V], got shape ", scores.sym_sizes());
  check_floating(scores, scores_name);
  TreeVerifySymShape s{scores.sym_size(0), scores.sym_size(1), scores.sym_size(2), parents.dim() == 2};
  TORCH_SYM_CHECK(s.T.sym_ge(1), scores_name, " must have at least one tree node (the root), got T = 0");
  TORCH_SYM_CHECK(s.V.sym_ge(1), scores_name, " must have a vocabulary of at least one token, got V = 0");
  check_int64_on(tree_tokens, "tree_tokens", scores, scores_name);
  const c10::SymInt bt[2] = {s.B, s.T};
  TORCH_SYM_CHECK(sym_sizes_eq(tree_tokens.sym_sizes(), bt), "tree_tokens must be [B, T] = [", s.B, ", ", s.T,
                  "] (", scores_name, ".shape[:2]), got ", tree_tokens.sym_sizes());
  check_int64_on(parents, "parents", scores, scores_name);
  // The rank picks the layout; no branch on a (possibly symbolic) size.
  TORCH_SYM_CHECK(sym_sizes_eq(parents.sym_sizes(), parents.dim() == 1 ? c10::SymIntArrayRef(&s.T, 1)
                                                                       : c10::SymIntArrayRef(bt)),
                  "parents must be [T] = [", s.T, "] or [B, T] = [", s.B, ", ", s.T,
                  "] with the T of tree_tokens, got ", parents.sym_sizes());
  return s;
}

inline TreeVerifyShape check_tree_verify_inputs(const at::Tensor& scores, const char* scores_name,
                                                const at::Tensor& tree_tokens, const at::Tensor& parents) {
  return check_tree_verify_inputs_sym(scores, scores_name, tree_tokens, parents).concrete();
}

// uniforms float32 [B, U] with U >= T: one per child tried (at most T - 1) plus one for the bonus.
inline void check_uniforms(const at::Tensor& uniforms, const TreeVerifySymShape& s, const at::Tensor& probs) {
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat, "uniforms must be float32, got ",
              uniforms.scalar_type());
  check_same_device(uniforms, "uniforms", probs, "probs");
  TORCH_CHECK(uniforms.dim() == 2, "uniforms must be [B, U] with B = ", s.B, " and U >= T = ", s.T,
              " (one per child tried plus one for the bonus), got ", uniforms.sym_sizes());
  TORCH_SYM_CHECK(uniforms.sym_size(0).sym_eq(s.B) & uniforms.sym_size(1).sym_ge(s.T),
                  "uniforms must be [B, U] with B = ", s.B, " and U >= T = ", s.T,
                  " (one per child tried plus one for the bonus), got ", uniforms.sym_sizes());
}

// verify_tree_sampling: the verification's checks and the uniforms.
inline TreeVerifySymShape check_verify_tree_sampling_inputs_sym(const at::Tensor& probs,
                                                                const at::Tensor& tree_tokens,
                                                                const at::Tensor& parents,
                                                                const at::Tensor& uniforms) {
  const TreeVerifySymShape s = check_tree_verify_inputs_sym(probs, "probs", tree_tokens, parents);
  check_uniforms(uniforms, s, probs);
  return s;
}

inline TreeVerifyShape check_verify_tree_sampling_inputs(const at::Tensor& probs, const at::Tensor& tree_tokens,
                                                         const at::Tensor& parents, const at::Tensor& uniforms) {
  return check_verify_tree_sampling_inputs_sym(probs, tree_tokens, parents, uniforms).concrete();
}

// k_cache/v_cache [B, L_max, H, D|Dv] (any dtype: the op moves elements), cache_lens int64 [B],
// accepted int64 [B, T], num_accepted int64 [B], all on k_cache's device. Returns T.
inline c10::SymInt check_compact_kv_cache_inputs_sym(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                     const at::Tensor& cache_lens, const at::Tensor& accepted,
                                                     const at::Tensor& num_accepted) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [B, L_max, Hkv, D], got shape ", k_cache.sym_sizes());
  const c10::SymInt B = k_cache.sym_size(0), L_max = k_cache.sym_size(1);
  check_bthd(v_cache, "v_cache", "[B, L_max, Hkv, Dv]", B, L_max, k_cache.sym_size(2), std::nullopt);
  check_same_device(v_cache, "v_cache", k_cache, "k_cache");
  check_cache_lens_shape(cache_lens, B, k_cache, "k_cache");
  check_int64_on(accepted, "accepted", k_cache, "k_cache");
  TORCH_CHECK(accepted.dim() == 2, "accepted must be [B, T] with B = ", B, ", got ", accepted.sym_sizes());
  TORCH_SYM_CHECK(accepted.sym_size(0).sym_eq(B), "accepted must be [B, T] with B = ", B, ", got ",
                  accepted.sym_sizes());
  check_int64_on(num_accepted, "num_accepted", k_cache, "k_cache");
  TORCH_CHECK(num_accepted.dim() == 1, "num_accepted must be [B] = [", B, "], got ", num_accepted.sym_sizes());
  TORCH_SYM_CHECK(num_accepted.sym_size(0).sym_eq(B), "num_accepted must be [B] = [", B, "], got ",
                  num_accepted.sym_sizes());
  return accepted.sym_size(1);
}

inline int64_t check_compact_kv_cache_inputs(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                             const at::Tensor& cache_lens, const at::Tensor& accepted,
                                             const at::Tensor& num_accepted) {
  return check_compact_kv_cache_inputs_sym(k_cache, v_cache, cache_lens, accepted, num_accepted).expect_int();
}

// ---- per-element value checks (host code) ----

// A tree token is a vocabulary id or -1 (padding); the root must be a real token.
inline void check_tree_token(int64_t token, int64_t b, int64_t i, int64_t V) {
  TORCH_CHECK(token >= (i == 0 ? 0 : -1) && token < V, "tree_tokens[", b, ", ", i, "] = ", token,
              " is not in the vocabulary of the logits/probs (V = ", V, ", the last dim)",
              i == 0 ? "; the root must be a real token" : "; padding is -1");
}

// accepted[b, :n] strictly ascending from accepted[b, 0] = 0 and every slot L + accepted[b, j] in the cache.
inline void check_accepted_path(const int64_t* accepted, int64_t n, int64_t T, int64_t b,
                                int64_t len, int64_t L_max) {
  TORCH_CHECK(n >= 1 && n <= T, "num_accepted[", b, "] = ", n, " must be in [1, T] = [1, ", T, "]");
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = accepted[j];
    if (j == 0) {
      TORCH_CHECK(a == 0, "accepted[", b, ", 0] = ", a, " must be 0 (the root is always kept)");
    } else {
      TORCH_CHECK(a > accepted[j - 1] && a < T, "accepted[", b, ", ", j, "] = ", a,
                  " must be a node index in [0, T) above accepted[", b, ", ", j - 1,
                  "] (the accepted path ascends from the root)");
    }
    TORCH_CHECK(len + a < L_max, "accepted[", b, ", ", j, "] = ", a, " addresses cache slot ",
                len + a, " beyond L_max = ", L_max, " (cache_lens[", b, "] = ", len, ")");
  }
}

}  // namespace leanformer
