// Argument checks of decode_attention (one new token per sequence over a KV cache: RoPE, the
// cache write and the attention in one op), shared by the CPU, CUDA and Meta implementations.
//
// qkv [B, (H + 2 Hkv) * D] (q, k, v of the new token side by side, any strides), k_cache and
// v_cache [B, L, Hkv, D] contiguous in qkv's dtype (written at row lens[b]), lens int64 [B],
// cos and sin float32 [P, D] (the RoPE tables; row lens[b] is used), num_heads = H. Shape, dtype
// and device checks read no data; the values of lens (0 <= lens[b] < L, lens[b] < P) are value
// checks the kernels run on what they read (device asserts on CUDA).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace leanformer {

struct DecodeAttentionShape {
  int64_t B, H, Hkv, D, L, P;
};

struct DecodeAttentionSymShape {
  c10::SymInt B, H, Hkv, D, L, P;
  DecodeAttentionShape concrete() const {
    return {B.expect_int(), H.expect_int(), Hkv.expect_int(), D.expect_int(), L.expect_int(), P.expect_int()};
  }
};

inline DecodeAttentionSymShape check_decode_attention_inputs_sym(const at::Tensor& qkv, const at::Tensor& k_cache,
                                                                 const at::Tensor& v_cache, const at::Tensor& lens,
                                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                                 int64_t num_heads) {
  const auto st = qkv.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "decode_attention: qkv must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(qkv.dim() == 2, "decode_attention: qkv must be [B, (H + 2 Hkv) * D], got shape ", qkv.sym_sizes());
  TORCH_CHECK(num_heads >= 1, "decode_attention: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(k_cache.dim() == 4, "decode_attention: k_cache must be [B, L, Hkv, D], got shape ",
              k_cache.sym_sizes());
  // P: cos's rows, once cos is known to be [P, D].
  DecodeAttentionSymShape s{qkv.sym_size(0),     c10::SymInt(num_heads), k_cache.sym_size(2),
                            k_cache.sym_size(3), k_cache.sym_size(1),    c10::SymInt(0)};
  check_bthd(k_cache, "decode_attention: k_cache", "[B, L, Hkv, D]", s.B, std::nullopt, std::nullopt, std::nullopt);
  check_bthd(v_cache, "decode_attention: v_cache", "[B, L, Hkv, D]", s.B, s.L, s.Hkv, s.D);
  check_like(k_cache, "decode_attention: k_cache", qkv, "qkv");
  check_like(v_cache, "decode_attention: v_cache", qkv, "qkv");
  TORCH_SYM_CHECK(k_cache.sym_is_contiguous(), "decode_attention: k_cache must be contiguous (it is written in "
                  "place at row lens[b]), got strides ", k_cache.sym_strides());
  TORCH_SYM_CHECK(v_cache.sym_is_contiguous(), "decode_attention: v_cache must be contiguous (it is written in "
                  "place at row lens[b]), got strides ", v_cache.sym_strides());
  // Two checks: the remainder is only defined for Hkv > 0.
  TORCH_SYM_CHECK(s.Hkv.sym_gt(0), "decode_attention: num_heads = ", num_heads,
                  " must be a multiple of the key/value heads Hkv = ", s.Hkv, " (k_cache.shape[2])");
  TORCH_SYM_CHECK((s.H % s.Hkv).sym_eq(0), "decode_attention: num_heads = ", num_heads,
                  " must be a multiple of the key/value heads Hkv = ", s.Hkv, " (k_cache.shape[2])");
  TORCH_SYM_CHECK((s.D % 2).sym_eq(0) & s.D.sym_gt(0), "decode_attention: the head dim D = ", s.D,
                  " (k_cache.shape[3]) must be even and positive (rotate-half RoPE)");
  const c10::SymInt width = (s.H + 2 * s.Hkv) * s.D;
  TORCH_SYM_CHECK(qkv.sym_size(1).sym_eq(width), "decode_attention: qkv must be [B, (H + 2 Hkv) * D] = [", s.B, ", ",
                  width, "] (H = num_heads = ", num_heads, ", Hkv, D = k_cache.shape[2:]), got ", qkv.sym_sizes());
  check_int64_on(lens, "decode_attention: lens", qkv, "qkv");
  TORCH_CHECK(lens.dim() == 1, "decode_attention: lens must be int64 [B] = [", s.B, "], got ", lens.sym_sizes());
  TORCH_SYM_CHECK(lens.sym_size(0).sym_eq(s.B), "decode_attention: lens must be int64 [B] = [", s.B, "], got ",
                  lens.sym_sizes());
  const auto check_table = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_attention: ", name, " must be float32 [P, D], got ",
                t.scalar_type());
    check_same_device(t, name, qkv, "qkv");
    TORCH_CHECK(t.dim() == 2, "decode_attention: ", name, " must be float32 [P, D] with D = ", s.D, ", got shape ",
                t.sym_sizes());
  };
  check_table(cos, "cos");
  TORCH_SYM_CHECK(cos.sym_size(1).sym_eq(s.D), "decode_attention: cos must be float32 [P, D] with D = ", s.D,
                  " (k_cache.shape[3]), got shape ", cos.sym_sizes());
  s.P = cos.sym_size(0);
  check_table(sin, "sin");
  TORCH_SYM_CHECK(sym_sizes_eq(sin.sym_sizes(), cos.sym_sizes()), "decode_attention: sin must be float32 [P, D] = ",
                  cos.sym_sizes(), " (cos's shape), got shape ", sin.sym_sizes());
  return s;
}

inline DecodeAttentionShape check_decode_attention_inputs(const at::Tensor& qkv, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache, const at::Tensor& lens,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          int64_t num_heads) {
  return check_decode_attention_inputs_sym(qkv, k_cache, v_cache, lens, cos, sin, num_heads).concrete();
}

// Calls run(scalar_t{}) for qkv's dtype, one of the three the checks admit (float32, bfloat16,
// float16): the kernels' dtype dispatch, CPU and CUDA.
template <typename F>
void dispatch_decode_attention_dtype(at::ScalarType dtype, F&& run) {
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;
  }
}

// decode_attention_tree: qkv [B, T, (H + 2 Hkv) * D] (the T nodes of each sequence's token tree,
// the last dimension contiguous or not), parents int64 [T] (one tree for the batch) or [B, T]; the
// rest as decode_attention. Node i's key and value go to cache row lens[b] + i.
inline DecodeAttentionSymShape check_decode_attention_tree_inputs(const at::Tensor& qkv, const at::Tensor& k_cache,
                                                                  const at::Tensor& v_cache, const at::Tensor& lens,
                                                                  const at::Tensor& cos, const at::Tensor& sin,
                                                                  int64_t num_heads, const at::Tensor& parents) {
  TORCH_CHECK(qkv.dim() == 3, "decode_attention_tree: qkv must be [B, T, (H + 2 Hkv) * D], got shape ",
              qkv.sym_sizes());
  // The node dimension aside, decode_attention's rules (its messages name it).
  const DecodeAttentionSymShape s =
      check_decode_attention_inputs_sym(at::empty_symint({qkv.sym_size(0), qkv.sym_size(2)}, qkv.options()),
                                        k_cache, v_cache, lens, cos, sin, num_heads);  // (T may be 0)
  const c10::SymInt T = qkv.sym_size(1);
  check_int64_on(parents, "decode_attention_tree: parents", qkv, "qkv");
  const c10::SymInt shared[1] = {T}, batched[2] = {s.B, T};
  TORCH_SYM_CHECK(sym_sizes_eq(parents.sym_sizes(), parents.dim() == 1 ? c10::SymIntArrayRef(shared)
                                                                       : c10::SymIntArrayRef(batched)),
                  "decode_attention_tree: parents must be [T] = [", T, "] or [B, T] = [", s.B, ", ", T,
                  "] (T = qkv.shape[1]), got ", parents.sym_sizes());
  return s;
}

// lens[b]: the cache holds it and one more token, and the RoPE tables have its row.
inline void check_decode_len(int64_t len, int64_t b, int64_t L, int64_t P) {
  TORCH_CHECK(len >= 0 && len < L, "decode_attention: lens[", b, "] = ", len,
              " leaves no room for the new token: it must be in [0, L - 1] = [0, ", L - 1, "]");
  TORCH_CHECK(len < P, "decode_attention: lens[", b, "] = ", len, " has no row in cos and sin (P = ", P,
              " positions)");
}

// A tree of T nodes at lens[b]: rows lens[b] .. lens[b] + T - 1 of the cache, and positions up to
// lens[b] + max_depth of the RoPE tables.
inline void check_decode_tree_len(int64_t len, int64_t b, int64_t T, int64_t max_depth, int64_t L, int64_t P) {
  TORCH_CHECK(len >= 0 && len + T <= L, "decode_attention_tree: lens[", b, "] = ", len, " leaves no room for the ", T,
              " tree nodes: it must be in [0, L - T] = [0, ", L - T, "]");
  TORCH_CHECK(len + max_depth < P, "decode_attention_tree: lens[", b, "] + the tree's depth = ", len + max_depth,
              " has no row in cos and sin (P = ", P, " positions)");
}

}  // namespace leanformer
