// The argument checks every op family shares (dtype, device, layout, token trees). Each family's
// own checks (csrc/<family>_checks.h) are written with these, and every backend of an op calls
// its family's checks first (CPU, CUDA and Meta: csrc/<family>_meta.cpp), so a direct torch.ops
// call gets the same clear error, naming the argument, on every device, and torch.compile /
// torch.export (which run the Meta kernels on fake tensors) refuse what eager refuses.
//
// Sizes are SymInts: every size comparison is written on t.sym_size(i) / t.sym_sizes() with
// TORCH_SYM_CHECK(a.sym_eq(b), ...) (sym_le, sym_lt, ...), never on t.size(i). On real tensors a
// SymInt is a plain integer (no cost to speak of); on fake tensors with symbolic shapes
// (torch.compile(dynamic=True), export) a comparison becomes a guard of the compiled graph. A
// check never branches on a symbolic size. What needs the data (parents forming a tree, token
// ids within the vocabulary, cache_lens within the cache, indices below d_ff) cannot be checked
// on fake tensors: those value checks stay in the real kernels (below, and in each family).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace leanformer {

// ---- symbolic sizes ----

// a == b dim by dim (false for different ranks).
inline c10::SymBool sym_sizes_eq(c10::SymIntArrayRef a, c10::SymIntArrayRef b) {
  if (a.size() != b.size()) return c10::SymBool(false);
  c10::SymBool eq(true);
  for (size_t i = 0; i < a.size(); ++i) eq = eq.sym_and(a[i].sym_eq(b[i]));
  return eq;
}

// t's sizes but the last, [...] of [..., C] (t has at least one dimension).
inline c10::SymIntArrayRef leading_sizes(const at::Tensor& t) {
  return t.sym_sizes().slice(0, t.dim() - 1);
}

// shape with its last size replaced by last.
inline std::vector<c10::SymInt> with_last_size(c10::SymIntArrayRef shape, const c10::SymInt& last) {
  std::vector<c10::SymInt> out(shape.begin(), shape.end());
  out.back() = last;
  return out;
}

// The product of t's leading sizes: the rows of [..., C] (also when C = 0).
inline c10::SymInt leading_numel(const at::Tensor& t) {
  c10::SymInt rows = 1;
  for (const auto& s : leading_sizes(t)) rows = rows * s;
  return rows;
}

// "[a, b, c]" with "*" for an absent size (any), for messages.
inline std::string sizes_str(std::initializer_list<std::optional<c10::SymInt>> sizes) {
  std::ostringstream out;
  out << "[";
  const char* sep = "";
  for (const auto& s : sizes) {
    out << sep;
    if (s.has_value()) out << *s; else out << "*";
    sep = ", ";
  }
  out << "]";
  return out.str();
}

// ---- dtypes and devices ----

// The floating dtypes the kernels take: float32, float16, bfloat16 and float64 (gradcheck).
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

// States, statistics and accumulators: fp64 for fp64 inputs (gradcheck), fp32 for the others.
inline at::ScalarType accumulate_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// t has ref's dtype and device.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, name, ref, ref_name);
}

// States, statistics and accumulators of ref's inputs: accumulate_dtype(ref) on ref's device.
inline void check_accumulator(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  const auto dtype = accumulate_dtype(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " for ", ref.scalar_type(), " ",
              ref_name, " (it accumulates in fp32, fp64 for fp64 inputs), got ", t.scalar_type());
  check_same_device(t, name, ref, ref_name);
}

// An index tensor: int64 on ref's device.
inline void check_int64_on(const at::Tensor& t, const char* name, const at::Tensor& ref,
                           const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64 (torch.long), got ",
              t.scalar_type());
  check_same_device(t, name, ref, ref_name);
}

// ---- shapes ----

// [..., last]: at least one dimension (layout names it, e.g. "[..., K]").
inline void check_not_scalar(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() >= 1, name, " must be ", layout, " with at least one dimension, got a scalar");
}

// A vector [size] (a bias, a per-channel parameter) in ref's dtype on ref's device; size_name
// says where size comes from (e.g. "d_model"). Nothing to check when t is absent.
inline void check_vector(const std::optional<at::Tensor>& t, const char* name, const c10::SymInt& size,
                         const char* size_name, const at::Tensor& ref, const char* ref_name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1, name, " must have shape [", size_name, "] = [", size, "], got ",
              t->sym_sizes());
  TORCH_SYM_CHECK(t->sym_size(0).sym_eq(size), name, " must have shape [", size_name, "] = [", size,
                  "], got ", t->sym_sizes());
  check_like(*t, name, ref, ref_name);
}

// [B, T, H, D] with the given sizes (std::nullopt: any, "*" in the message).
using AnySize = std::optional<c10::SymInt>;
inline void check_bthd(const at::Tensor& t, const char* name, const char* layout, const AnySize& B,
                       const AnySize& T, const AnySize& H, const AnySize& D) {
  TORCH_CHECK(t.dim() == 4, name, " must be ", layout, ", got shape ", t.sym_sizes());
  const AnySize* want[4] = {&B, &T, &H, &D};
  for (int i = 0; i < 4; ++i)
    if (want[i]->has_value())
      TORCH_SYM_CHECK(t.sym_size(i).sym_eq(**want[i]), name, " must be ", layout, " = ",
                      sizes_str({B, T, H, D}), " (*: any), got ", t.sym_sizes());
}

// ---- the state of linear attention (linear_attention, tree_attention's tree_linear_attention) ----

// S [B, H, Dk, Dv] and z [B, H, Dk], in the accumulate dtype of q on q's device.
inline void check_linear_attention_state(const at::Tensor& S, const char* S_name, const at::Tensor& z,
                                         const char* z_name, const c10::SymInt& B, const c10::SymInt& H,
                                         const c10::SymInt& Dk, const c10::SymInt& Dv, const at::Tensor& q) {
  const c10::SymInt want_S[4] = {B, H, Dk, Dv}, want_z[3] = {B, H, Dk};
  TORCH_SYM_CHECK(sym_sizes_eq(S.sym_sizes(), want_S), S_name, " must have shape [B, H, Dk, Dv] = [", B, ", ",
                  H, ", ", Dk, ", ", Dv, "], got ", S.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(z.sym_sizes(), want_z), z_name, " must have shape [B, H, Dk] = [", B, ", ", H,
                  ", ", Dk, "], got ", z.sym_sizes());
  check_accumulator(S, S_name, q, "q");
  check_accumulator(z, z_name, q, "q");
}

// ---- token trees (tree_attention, tree_verify, tree_state) ----
// A tree of T nodes: parents int64 [T] or [B, T] with parents[0] = -1 and 0 <= parents[i] < i;
// tree_mask bool [T, T] or [B, T, T], [i, j] true iff j is i or an ancestor of i.

// tree_mask bool [T, T] (one tree for the batch) or [B, T, T].
inline void check_tree_mask(const at::Tensor& tree_mask, const c10::SymInt& B, const c10::SymInt& T,
                            const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(tree_mask.scalar_type() == at::kBool, "tree_mask must be bool, got ",
              tree_mask.scalar_type());
  check_same_device(tree_mask, "tree_mask", ref, ref_name);
  const c10::SymInt shared[2] = {T, T}, batched[3] = {B, T, T};
  // The rank picks the layout; no branch on a (possibly symbolic) size.
  TORCH_SYM_CHECK(sym_sizes_eq(tree_mask.sym_sizes(), tree_mask.dim() == 2 ? c10::SymIntArrayRef(shared)
                                                                         : c10::SymIntArrayRef(batched)),
                  "tree_mask must be [T, T] = [", T, ", ", T, "] or [B, T, T] = [", B, ", ", T, ", ", T,
                  "] (T = the number of tree nodes, ", ref_name, ".shape[1]), got ", tree_mask.sym_sizes());
}

// cache_lens int64 [B]; the values are checked by check_cache_len / check_cache_lens_range.
inline void check_cache_lens_shape(const at::Tensor& cache_lens, const c10::SymInt& B, const at::Tensor& ref,
                                   const char* ref_name) {
  check_int64_on(cache_lens, "cache_lens", ref, ref_name);
  TORCH_CHECK(cache_lens.dim() == 1, "cache_lens must be [B] = [", B, "], got ", cache_lens.sym_sizes());
  TORCH_SYM_CHECK(cache_lens.sym_size(0).sym_eq(B), "cache_lens must be [B] = [", B, "], got ",
                  cache_lens.sym_sizes());
}

// ---- per-element value checks (host code): a kernel calls them on the values it reads ----
// They need the data, so they run in the real kernels only (eager, and a compiled graph when its
// kernel runs), never in the Meta kernels.

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

// parents[0] = -1 and 0 <= parents[i] < i.
inline void check_parent(int64_t parent, int64_t b, int64_t i) {
  TORCH_CHECK(i == 0 ? parent == -1 : (parent >= 0 && parent < i), "parents[", b, ", ", i,
              "] = ", parent,
              i == 0 ? ": the root's parent must be -1" : ": must be in [0, i) (parents[i] < i)");
}

}  // namespace leanformer
