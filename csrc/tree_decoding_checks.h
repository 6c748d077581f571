// Argument checks of the tree-decoding ops (tree_attention, tree_linear_attention,
// verify_tree_greedy / verify_tree_sampling, compact_kv_cache), shared by the CPU and CUDA
// backends so a direct torch.ops call gets the same clear error everywhere.
//
// Shape, dtype and device checks read no tensor data. The value checks (cache_lens within the
// cache, parents forming a tree, token ids within the vocabulary, accepted paths ascending) are
// the per-element helpers at the end: a kernel calls them on the values it reads anyway, or,
// where the data lives on the GPU, check_cache_lens_range reads two scalars back.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {

// Dimensions of tree_attention: q [B, T, Hq, D], caches [B, L_max, Hkv, D|Dv].
struct TreeAttentionShape {
  int64_t B, T, Hq, Hkv, D, Dv, L_max;
};

// Dimensions of tree_linear_attention: q, k [B, T, H, Dk], v [B, T, H, Dv].
struct TreeLinearShape {
  int64_t B, T, H, Dk, Dv;
};

// Dimensions of the verification ops: logits/probs [B, T, V].
struct TreeVerifyShape {
  int64_t B, T, V;
  bool batched_parents;  // parents is [B, T] (else one [T] tree for every sequence)
};

inline void check_tree_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_same_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                                    const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_int64_on(const at::Tensor& t, const char* name, const at::Tensor& ref,
                           const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64 (torch.long), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// [B, T, H, D] with the given leading sizes (-1: any).
inline void check_bthd(const at::Tensor& t, const char* name, const char* layout, int64_t B,
                       int64_t T, int64_t H, int64_t D) {
  TORCH_CHECK(t.dim() == 4, name, " must be ", layout, ", got shape ", t.sizes());
  const int64_t want[4] = {B, T, H, D};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(want[i] < 0 || t.size(i) == want[i], name, " must be ", layout, " = [", B, ", ",
                T, ", ", H, ", ", D, "] (-1: any), got ", t.sizes());
}

// tree_mask bool [T, T] (one tree for the batch) or [B, T, T].
inline void check_tree_mask(const at::Tensor& tree_mask, int64_t B, int64_t T,
                            const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(tree_mask.scalar_type() == at::kBool, "tree_mask must be bool, got ",
              tree_mask.scalar_type());
  TORCH_CHECK(tree_mask.device() == ref.device(), "tree_mask is on ", tree_mask.device(), " but ",
              ref_name, " is on ", ref.device());
  const bool shared = tree_mask.dim() == 2 && tree_mask.size(0) == T && tree_mask.size(1) == T;
  const bool batched = tree_mask.dim() == 3 && tree_mask.size(0) == B && tree_mask.size(1) == T &&
                       tree_mask.size(2) == T;
  TORCH_CHECK(shared || batched, "tree_mask must be [T, T] = [", T, ", ", T, "] or [B, T, T] = [",
              B, ", ", T, ", ", T, "] (T = the number of tree nodes, ", ref_name,
              ".shape[1]), got ", tree_mask.sizes());
}

// cache_lens int64 [B]; the values are checked by check_cache_len / check_cache_lens_range.
inline void check_cache_lens_shape(const at::Tensor& cache_lens, int64_t B, const at::Tensor& ref,
                                   const char* ref_name) {
  check_int64_on(cache_lens, "cache_lens", ref, ref_name);
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.size(0) == B, "cache_lens must be [B] = [", B,
              "], got ", cache_lens.sizes());
}

inline TreeAttentionShape check_tree_attention_inputs(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache,
                                                      const at::Tensor& cache_lens,
                                                      const at::Tensor& k_tree,
                                                      const at::Tensor& v_tree,
                                                      const at::Tensor& tree_mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, Hq, D], got shape ", q.sizes());
  check_tree_floating(q, "q");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [B, L_max, Hkv, D], got shape ", k_cache.sizes());
  TreeAttentionShape s{q.size(0), q.size(1), q.size(2), k_cache.size(2), q.size(3), -1,
                       k_cache.size(1)};
  check_bthd(k_cache, "k_cache", "[B, L_max, Hkv, D]", s.B, -1, -1, s.D);
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "the query heads Hq = ", s.Hq,
              " (q.shape[2]) must be a multiple of the key/value heads Hkv = ", s.Hkv,
              " (k_cache.shape[2])");
  TORCH_CHECK(v_cache.dim() == 4, "v_cache must be [B, L_max, Hkv, Dv], got shape ", v_cache.sizes());
  s.Dv = v_cache.size(3);
  check_bthd(v_cache, "v_cache", "[B, L_max, Hkv, Dv]", s.B, s.L_max, s.Hkv, s.Dv);
  check_bthd(k_tree, "k_tree", "[B, T, Hkv, D]", s.B, s.T, s.Hkv, s.D);
  check_bthd(v_tree, "v_tree", "[B, T, Hkv, Dv]", s.B, s.T, s.Hkv, s.Dv);
  check_same_dtype_device(k_cache, "k_cache", q, "q");
  check_same_dtype_device(v_cache, "v_cache", q, "q");
  check_same_dtype_device(k_tree, "k_tree", q, "q");
  check_same_dtype_device(v_tree, "v_tree", q, "q");
  check_cache_lens_shape(cache_lens, s.B, q, "q");
  check_tree_mask(tree_mask, s.B, s.T, q, "q");
  return s;
}

// The prefix state of linear attention accumulates in fp32 (fp64 for fp64 inputs, gradcheck),
// as sla_forward's final state.
inline at::ScalarType tree_state_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline TreeLinearShape check_tree_linear_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& S,
                                                          const at::Tensor& z,
                                                          const at::Tensor& tree_mask) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got shape ", q.sizes());
  check_tree_floating(q, "q");
  TORCH_CHECK(v.dim() == 4, "v must be [B, T, H, Dv], got shape ", v.sizes());
  TreeLinearShape s{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  check_bthd(k, "k", "[B, T, H, Dk]", s.B, s.T, s.H, s.Dk);
  check_bthd(v, "v", "[B, T, H, Dv]", s.B, s.T, s.H, s.Dv);
  check_same_dtype_device(k, "k", q, "q");
  check_same_dtype_device(v, "v", q, "q");
  TORCH_CHECK(S.dim() == 4 && S.size(0) == s.B && S.size(1) == s.H && S.size(2) == s.Dk &&
                  S.size(3) == s.Dv,
              "S must be [B, H, Dk, Dv] = [", s.B, ", ", s.H, ", ", s.Dk, ", ", s.Dv, "], got ",
              S.sizes());
  TORCH_CHECK(z.dim() == 3 && z.size(0) == s.B && z.size(1) == s.H && z.size(2) == s.Dk,
              "z must be [B, H, Dk] = [", s.B, ", ", s.H, ", ", s.Dk, "], got ", z.sizes());
  const auto state = tree_state_dtype(q.scalar_type());
  TORCH_CHECK(S.scalar_type() == state, "S must be ", state, " for ", q.scalar_type(),
              " inputs (the prefix state accumulates in fp32), got ", S.scalar_type());
  TORCH_CHECK(z.scalar_type() == state, "z must be ", state, " for ", q.scalar_type(),
              " inputs (the prefix state accumulates in fp32), got ", z.scalar_type());
  TORCH_CHECK(S.device() == q.device(), "S is on ", S.device(), " but q is on ", q.device());
  TORCH_CHECK(z.device() == q.device(), "z is on ", z.device(), " but q is on ", q.device());
  check_tree_mask(tree_mask, s.B, s.T, q, "q");
  return s;
}

// logits or probs [B, T, V]; tree_tokens int64 [B, T] (-1 = padding); parents int64 [T] or
// [B, T] with the same T.
inline TreeVerifyShape check_tree_verify_inputs(const at::Tensor& scores, const char* scores_name,
                                                const at::Tensor& tree_tokens,
                                                const at::Tensor& parents) {
  TORCH_CHECK(scores.dim() == 3, scores_name, " must be [B, T, V], got shape ", scores.sizes());
  check_tree_floating(scores, scores_name);
  TreeVerifyShape s{scores.size(0), scores.size(1), scores.size(2), parents.dim() == 2};
  TORCH_CHECK(s.T >= 1, scores_name, " must have at least one tree node (the root), got T = 0");
  TORCH_CHECK(s.V >= 1, scores_name, " must have a vocabulary of at least one token, got V = 0");
  check_int64_on(tree_tokens, "tree_tokens", scores, scores_name);
  TORCH_CHECK(tree_tokens.dim() == 2 && tree_tokens.size(0) == s.B && tree_tokens.size(1) == s.T,
              "tree_tokens must be [B, T] = [", s.B, ", ", s.T, "] (", scores_name,
              ".shape[:2]), got ", tree_tokens.sizes());
  check_int64_on(parents, "parents", scores, scores_name);
  TORCH_CHECK((parents.dim() == 1 && parents.size(0) == s.T) ||
                  (parents.dim() == 2 && parents.size(0) == s.B && parents.size(1) == s.T),
              "parents must be [T] = [", s.T, "] or [B, T] = [", s.B, ", ", s.T,
              "] with the T of tree_tokens, got ", parents.sizes());
  return s;
}

// uniforms float32 [B, U] with U >= T: one per child tried (at most T - 1) plus one for the bonus.
inline void check_uniforms(const at::Tensor& uniforms, const TreeVerifyShape& s,
                           const at::Tensor& probs) {
  TORCH_CHECK(uniforms.scalar_type() == at::kFloat, "uniforms must be float32, got ",
              uniforms.scalar_type());
  TORCH_CHECK(uniforms.device() == probs.device(), "uniforms is on ", uniforms.device(),
              " but probs is on ", probs.device());
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == s.B && uniforms.size(1) >= s.T,
              "uniforms must be [B, U] with B = ", s.B, " and U >= T = ", s.T,
              " (one per child tried plus one for the bonus), got ", uniforms.sizes());
}

// k_cache/v_cache [B, L_max, H, D|Dv], cache_lens int64 [B], accepted int64 [B, T],
// num_accepted int64 [B]. Returns T.
inline int64_t check_compact_kv_cache_inputs(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                             const at::Tensor& cache_lens,
                                             const at::Tensor& accepted,
                                             const at::Tensor& num_accepted) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [B, L_max, Hkv, D], got shape ", k_cache.sizes());
  const int64_t B = k_cache.size(0), L_max = k_cache.size(1);
  check_bthd(v_cache, "v_cache", "[B, L_max, Hkv, Dv]", B, L_max, k_cache.size(2), -1);
  TORCH_CHECK(v_cache.device() == k_cache.device(), "v_cache is on ", v_cache.device(),
              " but k_cache is on ", k_cache.device());
  check_cache_lens_shape(cache_lens, B, k_cache, "k_cache");
  check_int64_on(accepted, "accepted", k_cache, "k_cache");
  TORCH_CHECK(accepted.dim() == 2 && accepted.size(0) == B, "accepted must be [B, T] with B = ", B,
              ", got ", accepted.sizes());
  check_int64_on(num_accepted, "num_accepted", k_cache, "k_cache");
  TORCH_CHECK(num_accepted.dim() == 1 && num_accepted.size(0) == B,
              "num_accepted must be [B] = [", B, "], got ", num_accepted.sizes());
  return accepted.size(1);
}

// ---- per-element value checks (host code) ----

inline void check_cache_len(int64_t len, int64_t b, int64_t L_max) {
  TORCH_CHECK(len >= 0 && len <= L_max, "cache_lens[", b, "] = ", len,
              " is beyond the cache: it must be in [0, L_max] = [0, ", L_max, "]");
}

// For data on any device: reads min and max back (a sync on CUDA).
inline void check_cache_lens_range(const at::Tensor& cache_lens, int64_t L_max) {
  if (cache_lens.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(cache_lens);
  const int64_t mn = lo.item<int64_t>(), mx = hi.item<int64_t>();
  TORCH_CHECK(mn >= 0 && mx <= L_max, "cache_lens must be in [0, L_max] = [0, ", L_max,
              "] (a length beyond the cache), got values in [", mn, ", ", mx, "]");
}

// A node sees itself: without the diagonal a node of an empty prefix would attend to nothing.
inline void check_tree_mask_diagonal(bool diag, int64_t b, int64_t i) {
  TORCH_CHECK(diag, "tree_mask[", b, ", ", i, ", ", i, "] must be true (a node sees itself)");
}

// parents[0] = -1 and 0 <= parents[i] < i.
inline void check_parent(int64_t parent, int64_t b, int64_t i) {
  TORCH_CHECK(i == 0 ? parent == -1 : (parent >= 0 && parent < i), "parents[", b, ", ", i,
              "] = ", parent,
              i == 0 ? ": the root's parent must be -1" : ": must be in [0, i) (parents[i] < i)");
}

// A tree token is a vocabulary id or -1 (padding); the root must be a real token.
inline void check_tree_token(int64_t token, int64_t b, int64_t i, int64_t V) {
  TORCH_CHECK(token >= (i == 0 ? 0 : -1) && token < V, "tree_tokens[", b, ", ", i, "] = ", token,
              " is not in the vocabulary of the logits/probs (V = ", V, ", the last dim)",
              i == 0 ? "; the root must be a real token" : "; padding is -1");
}

// accepted[b, :n] strictly ascending from 0 and every slot L + accepted[b, j] in the cache.
inline void check_accepted_path(const int64_t* accepted, int64_t n, int64_t T, int64_t b,
                                int64_t len, int64_t L_max) {
  TORCH_CHECK(n >= 1 && n <= T, "num_accepted[", b, "] = ", n, " must be in [1, T] = [1, ", T, "]");
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = accepted[j];
    TORCH_CHECK(a >= (j ? accepted[j - 1] + 1 : 0) && a < T, "accepted[", b, ", ", j, "] = ", a,
                " must be a node index in [0, T) above accepted[", b, ", ", j - 1,
                "] (the accepted path ascends from the root)");
    TORCH_CHECK(len + a < L_max, "accepted[", b, ", ", j, "] = ", a, " addresses cache slot ",
                len + a, " beyond L_max = ", L_max, " (cache_lens[", b, "] = ", len, ")");
  }
}

}  // namespace leanformer
