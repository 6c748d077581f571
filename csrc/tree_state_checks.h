// Argument checks of the tree_state family, the ops that carry a SLAB LM's recurrent state
// through a token tree, shared by the CPU, CUDA and Meta implementations.
//
// sla_tree_commit, per layer l: S[l] [B, H, Dk, Dv] and z[l] [B, H, Dk] (float32/float64 state,
// updated in place), k[l] [B, T_l, H, Dk] and v[l] [B, T_l, H, Dv] (the tree's keys and values,
// any float dtype and strides; the path reads nodes below every T_l), conv_tail[l]
// [B*H, Dv, W] (or an empty list when the layer has no conv); path int64 [B, n] (accepted node
// indices, root first) and num_accepted int64 [B] (<= n).
//
// tree_dwconv: v [B, T, H, D] (any strides), conv_tail [B*H, D, W] (the causal conv's last W
// values of V before the tree, oldest first), parents int64 [T] or [B, T] (parents[0] = -1,
// -1 <= parents[i] < i), weight [D, W + 1] (the depthwise Conv1d's taps, shared by the heads),
// bias [D] or none; all floating tensors in v's dtype.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace leanformer {

// Shapes, dtypes and devices, on symbolic sizes (csrc/checks.h): every backend runs them (CPU,
// CUDA, Meta). The values of path / num_accepted and parents are checked by
// check_sla_tree_commit_values / check_tree_dwconv_parents, which need the data (the CPU
// kernels; never on meta or fake tensors).
inline void check_sla_tree_commit_inputs(at::TensorList S, at::TensorList z, at::TensorList conv_tail,
                                         at::TensorList k, at::TensorList v, const at::Tensor& path,
                                         const at::Tensor& num_accepted) {
  const size_t L = S.size();
  TORCH_CHECK(L >= 1, "sla_tree_commit: S must hold one state per layer, got an empty list");
  TORCH_CHECK(z.size() == L && k.size() == L && v.size() == L,
              "sla_tree_commit: S, z, k and v must have one tensor per layer each, got ", L, ", ", z.size(), ", ",
              k.size(), ", ", v.size());
  TORCH_CHECK(conv_tail.empty() || conv_tail.size() == L, "sla_tree_commit: conv_tail must be empty or hold ", L,
              " tensors (one per layer), got ", conv_tail.size());
  TORCH_CHECK(S[0].dim() == 4, "sla_tree_commit: S[0] must be [B, H, Dk, Dv], got ", S[0].sym_sizes());
  const c10::SymInt B = S[0].sym_size(0), H = S[0].sym_size(1), Dk = S[0].sym_size(2), Dv = S[0].sym_size(3);
  const auto dev = S[0].device();
  // The odd one out, by name ("k[1] is on meta but S[0] is on cpu").
  const auto check_device = [&](const at::Tensor& t, const char* name, size_t l) {
    TORCH_CHECK(t.device() == dev, "sla_tree_commit: ", name, "[", l, "] is on ", t.device(), " but S[0] is on ",
                dev);
  };
  TORCH_CHECK(path.scalar_type() == at::kLong && path.dim() == 2,
              "sla_tree_commit: path must be int64 [B, n] with B = ", B, ", got ", path.scalar_type(), " ",
              path.sym_sizes());
  TORCH_SYM_CHECK(path.sym_size(0).sym_eq(B), "sla_tree_commit: path must be int64 [B, n] with B = ", B, ", got ",
                  path.scalar_type(), " ", path.sym_sizes());
  TORCH_CHECK(num_accepted.scalar_type() == at::kLong && num_accepted.dim() == 1,
              "sla_tree_commit: num_accepted must be int64 [B] with B = ", B, ", got ", num_accepted.scalar_type(),
              " ", num_accepted.sym_sizes());
  TORCH_SYM_CHECK(num_accepted.sym_size(0).sym_eq(B), "sla_tree_commit: num_accepted must be int64 [B] with B = ",
                  B, ", got ", num_accepted.scalar_type(), " ", num_accepted.sym_sizes());
  TORCH_CHECK(path.device() == dev, "sla_tree_commit: path is on ", path.device(), " but S[0] is on ", dev);
  TORCH_CHECK(num_accepted.device() == dev, "sla_tree_commit: num_accepted is on ", num_accepted.device(),
              " but S[0] is on ", dev);
  for (size_t l = 0; l < L; ++l) {
    const auto st = S[l].scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, "sla_tree_commit: S[", l, "] must be float32 or float64, got ",
                st);
    check_device(S[l], "S", l);
    TORCH_SYM_CHECK(sym_sizes_eq(S[l].sym_sizes(), S[0].sym_sizes()) & S[l].sym_stride(3).sym_eq(1),
                    "sla_tree_commit: S[", l, "] must be [B, H, Dk, Dv] = ", S[0].sym_sizes(),
                    " with a contiguous last dim, got ", S[l].sym_sizes(), " with strides ", S[l].sym_strides());
    const c10::SymInt want_z[3] = {B, H, Dk};
    TORCH_CHECK(z[l].scalar_type() == st, "sla_tree_commit: z[", l, "] must have S[", l, "]'s dtype (", st,
                "), got ", z[l].scalar_type());
    TORCH_SYM_CHECK(sym_sizes_eq(z[l].sym_sizes(), want_z), "sla_tree_commit: z[", l, "] must be [B, H, Dk] = [",
                    B, ", ", H, ", ", Dk, "], got ", z[l].sym_sizes());
    check_device(z[l], "z", l);
    TORCH_CHECK(at::isFloatingType(k[l].scalar_type()), "sla_tree_commit: k[", l, "] must be a float dtype, got ",
                k[l].scalar_type());
    TORCH_CHECK(k[l].dim() == 4, "sla_tree_commit: k[", l, "] must be float [B, T, H, Dk] = [", B, ", T, ", H,
                ", ", Dk, "], got ", k[l].sym_sizes());
    // Layers may hold more nodes than the path reads (Hidden Transfer's extension): T is per layer.
    const c10::SymInt Tl = k[l].sym_size(1);
    const c10::SymInt want_k[4] = {B, Tl, H, Dk}, want_v[4] = {B, Tl, H, Dv};
    TORCH_SYM_CHECK(sym_sizes_eq(k[l].sym_sizes(), want_k), "sla_tree_commit: k[", l,
                    "] must be float [B, T, H, Dk] = [", B, ", T, ", H, ", ", Dk, "], got ", k[l].sym_sizes());
    check_device(k[l], "k", l);
    TORCH_CHECK(v[l].scalar_type() == k[l].scalar_type(), "sla_tree_commit: v[", l, "] must have k[", l,
                "]'s dtype (", k[l].scalar_type(), "), got ", v[l].scalar_type());
    TORCH_SYM_CHECK(sym_sizes_eq(v[l].sym_sizes(), want_v), "sla_tree_commit: v[", l,
                    "] must be float [B, T, H, Dv] = [", B, ", ", Tl, ", ", H, ", ", Dv, "], got ", v[l].sym_sizes());
    check_device(v[l], "v", l);
    if (!conv_tail.empty()) {
      TORCH_CHECK(at::isFloatingType(conv_tail[l].scalar_type()), "sla_tree_commit: conv_tail[", l,
                  "] must be a float dtype, got ", conv_tail[l].scalar_type());
      TORCH_CHECK(conv_tail[0].dim() == 3 && conv_tail[l].dim() == 3, "sla_tree_commit: conv_tail[", l,
                  "] must be float [B*H, Dv, W] = [", B * H, ", ", Dv, ", W], got ", conv_tail[l].sym_sizes());
      const c10::SymInt want_tail[3] = {B * H, Dv, conv_tail[0].sym_size(2)};
      TORCH_SYM_CHECK(sym_sizes_eq(conv_tail[l].sym_sizes(), want_tail), "sla_tree_commit: conv_tail[", l,
                      "] must be float [B*H, Dv, W] = [", B * H, ", ", Dv, ", ", conv_tail[0].sym_size(2), "], got ",
                      conv_tail[l].sym_sizes());
      check_device(conv_tail[l], "conv_tail", l);
    }
  }
}

// The values (real tensors on the CPU): num_accepted[b] <= n and the path's nodes in every
// layer's tree.
inline void check_sla_tree_commit_values(at::TensorList k, const at::Tensor& path, const at::Tensor& num_accepted) {
  int64_t T = k[0].size(1);
  for (const auto& kl : k) T = std::min(T, kl.size(1));
  const at::Tensor p = path.contiguous(), n = num_accepted.contiguous();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* np = n.const_data_ptr<int64_t>();
  const int64_t B = path.size(0), ps = path.size(1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(np[b] >= 0 && np[b] <= ps, "sla_tree_commit: num_accepted[", b, "] = ", np[b],
                " must be in [0, n = ", ps, "] (path.shape[1])");
    for (int64_t j = 0; j < np[b]; ++j)
      TORCH_CHECK(pp[b * ps + j] >= 0 && pp[b * ps + j] < T, "sla_tree_commit: path[", b, ", ", j, "] = ",
                  pp[b * ps + j], " is not a node of every layer's tree (T = ", T, ")");
  }
}

inline void check_tree_dwconv_inputs(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(v.dim() == 4, "tree_dwconv: v must be [B, T, H, D], got ", v.sym_sizes());
  check_floating(v, "tree_dwconv: v");
  const auto s = v.scalar_type();
  const c10::SymInt B = v.sym_size(0), T = v.sym_size(1), H = v.sym_size(2), D = v.sym_size(3);
  TORCH_CHECK(weight.dim() == 2, "tree_dwconv: weight must be [D, kernel_size] with D = v.shape[3] = ", D,
              ", got ", weight.sym_sizes());
  TORCH_SYM_CHECK(weight.sym_size(0).sym_eq(D) & weight.sym_size(1).sym_ge(1),
                  "tree_dwconv: weight must be [D, kernel_size] with D = v.shape[3] = ", D, ", got ",
                  weight.sym_sizes());
  const c10::SymInt W = weight.sym_size(1) - 1;
  const c10::SymInt want_tail[3] = {B * H, D, W};
  TORCH_SYM_CHECK(sym_sizes_eq(conv_tail.sym_sizes(), want_tail), "tree_dwconv: conv_tail must be [B*H, D, ",
                  "kernel_size - 1] = [", B * H, ", ", D, ", ", W, "], got ", conv_tail.sym_sizes());
  const c10::SymInt bt[2] = {B, T};
  TORCH_CHECK(parents.scalar_type() == at::kLong && (parents.dim() == 1 || parents.dim() == 2),
              "tree_dwconv: parents must be int64 [T] or [B, T] with B, T = ", B, ", ", T, " (v's), got ",
              parents.scalar_type(), " ", parents.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(parents.sym_sizes(), parents.dim() == 1 ? c10::SymIntArrayRef(&T, 1)
                                                                       : c10::SymIntArrayRef(bt)),
                  "tree_dwconv: parents must be int64 [T] or [B, T] with B, T = ", B, ", ", T, " (v's), got ",
                  parents.scalar_type(), " ", parents.sym_sizes());
  TORCH_CHECK(conv_tail.scalar_type() == s, "tree_dwconv: conv_tail must have v's dtype (", s, "), got ",
              conv_tail.scalar_type());
  TORCH_CHECK(weight.scalar_type() == s, "tree_dwconv: weight must have v's dtype (", s, "), got ",
              weight.scalar_type());
  check_same_device(conv_tail, "tree_dwconv: conv_tail", v, "v");
  check_same_device(parents, "tree_dwconv: parents", v, "v");
  check_same_device(weight, "tree_dwconv: weight", v, "v");
  check_vector(bias, "tree_dwconv: bias", D, "D", v, "v");
}

// The values (real tensors on the CPU): node 0 is the root (-1), -1 <= parents[i] < i.
inline void check_tree_dwconv_parents(const at::Tensor& parents) {
  const at::Tensor p = parents.contiguous();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t rows = parents.dim() == 2 ? parents.size(0) : 1, T = parents.size(-1);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t i = 0; i < T; ++i) {
      const int64_t par = pp[b * T + i];
      TORCH_CHECK(par >= -1 && par < i && (i > 0 || par == -1), "tree_dwconv: parents[", b, ", ", i, "] = ", par,
                  " is not a parent (node 0 is the root with parent -1; -1 <= parents[i] < i)");
    }
}

}  // namespace leanformer
