// Argument checks of the tree_state family, the ops that carry a SLAB LM's recurrent state
// through a token tree, shared by the CPU and CUDA implementations.
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
  TORCH_CHECK(S[0].dim() == 4, "sla_tree_commit: S[0] must be [B, H, Dk, Dv], got ", S[0].sizes());
  const int64_t B = S[0].size(0), H = S[0].size(1), Dk = S[0].size(2), Dv = S[0].size(3);
  const auto dev = S[0].device();
  TORCH_CHECK(path.scalar_type() == at::kLong && path.dim() == 2 && path.size(0) == B,
              "sla_tree_commit: path must be int64 [B, n] with B = ", B, ", got ", path.scalar_type(), " ",
              path.sizes());
  TORCH_CHECK(num_accepted.scalar_type() == at::kLong && num_accepted.dim() == 1 && num_accepted.size(0) == B,
              "sla_tree_commit: num_accepted must be int64 [B] with B = ", B, ", got ", num_accepted.scalar_type(),
              " ", num_accepted.sizes());
  TORCH_CHECK(path.device() == dev && num_accepted.device() == dev,
              "sla_tree_commit: path and num_accepted must be on S's device ", dev);
  int64_t T = -1;
  for (size_t l = 0; l < L; ++l) {
    const auto st = S[l].scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, "sla_tree_commit: S[", l, "] must be float32 or float64, got ",
                st);
    TORCH_CHECK(S[l].sizes() == S[0].sizes() && S[l].stride(3) == 1 && S[l].device() == dev,
                "sla_tree_commit: S[", l, "] must be [B, H, Dk, Dv] = ", S[0].sizes(), " on ", dev,
                " with a contiguous last dim, got ", S[l].sizes(), " on ", S[l].device());
    TORCH_CHECK(z[l].dim() == 3 && z[l].size(0) == B && z[l].size(1) == H && z[l].size(2) == Dk &&
                    z[l].scalar_type() == st && z[l].device() == dev,
                "sla_tree_commit: z[", l, "] must be [B, H, Dk] = [", B, ", ", H, ", ", Dk, "] in S[", l,
                "]'s dtype on ", dev, ", got ", z[l].scalar_type(), " ", z[l].sizes());
    TORCH_CHECK(k[l].dim() == 4 && k[l].size(0) == B && k[l].size(2) == H && k[l].size(3) == Dk &&
                    at::isFloatingType(k[l].scalar_type()) && k[l].device() == dev,
                "sla_tree_commit: k[", l, "] must be float [B, T, H, Dk] = [", B, ", T, ", H, ", ", Dk, "] on ", dev,
                ", got ", k[l].scalar_type(), " ", k[l].sizes());
    const int64_t Tl = k[l].size(1);  // layers may hold more nodes than the path reads (Hidden Transfer's extension)
    T = T < 0 ? Tl : std::min(T, Tl);
    TORCH_CHECK(v[l].scalar_type() == k[l].scalar_type(), "sla_tree_commit: v[", l, "] must have k[", l,
                "]'s dtype (", k[l].scalar_type(), "), got ", v[l].scalar_type());
    TORCH_CHECK(v[l].dim() == 4 && v[l].size(0) == B && v[l].size(1) == Tl && v[l].size(2) == H &&
                    v[l].size(3) == Dv && at::isFloatingType(v[l].scalar_type()) && v[l].device() == dev,
                "sla_tree_commit: v[", l, "] must be float [B, T, H, Dv] = [", B, ", ", Tl, ", ", H, ", ", Dv,
                "] on ", dev, ", got ", v[l].scalar_type(), " ", v[l].sizes());
    if (!conv_tail.empty())
      TORCH_CHECK(conv_tail[l].dim() == 3 && conv_tail[l].size(0) == B * H && conv_tail[l].size(1) == Dv &&
                      conv_tail[l].size(2) == conv_tail[0].size(2) && at::isFloatingType(conv_tail[l].scalar_type()) &&
                      conv_tail[l].device() == dev,
                  "sla_tree_commit: conv_tail[", l, "] must be float [B*H, Dv, W] = [", B * H, ", ", Dv, ", ",
                  conv_tail[0].size(2), "] on ", dev, ", got ", conv_tail[l].scalar_type(), " ",
                  conv_tail[l].sizes());
  }
  if (dev.is_cpu()) {  // the values (a GPU check would synchronize)
    const at::Tensor p = path.contiguous(), n = num_accepted.contiguous();
    const int64_t* pp = p.const_data_ptr<int64_t>();
    const int64_t* np = n.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(np[b] >= 0 && np[b] <= path.size(1), "sla_tree_commit: num_accepted[", b, "] = ", np[b],
                  " must be in [0, n = ", path.size(1), "] (path.shape[1])");
      for (int64_t j = 0; j < np[b]; ++j)
        TORCH_CHECK(pp[b * path.size(1) + j] >= 0 && pp[b * path.size(1) + j] < T, "sla_tree_commit: path[", b,
                    ", ", j, "] = ", pp[b * path.size(1) + j], " is not a node of every layer's tree (T = ", T, ")");
    }
  }
}

inline void check_tree_dwconv_inputs(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(v.dim() == 4, "tree_dwconv: v must be [B, T, H, D], got ", v.sizes());
  check_floating(v, "tree_dwconv: v");
  const auto s = v.scalar_type();
  const int64_t B = v.size(0), T = v.size(1), H = v.size(2), D = v.size(3);
  const auto dev = v.device();
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1,
              "tree_dwconv: weight must be [D, kernel_size] with D = v.shape[3] = ", D, ", got ", weight.sizes());
  const int64_t W = weight.size(1) - 1;
  TORCH_CHECK(conv_tail.dim() == 3 && conv_tail.size(0) == B * H && conv_tail.size(1) == D && conv_tail.size(2) == W,
              "tree_dwconv: conv_tail must be [B*H, D, kernel_size - 1] = [", B * H, ", ", D, ", ", W, "], got ",
              conv_tail.sizes());
  TORCH_CHECK(parents.scalar_type() == at::kLong &&
                  (parents.dim() == 1 || (parents.dim() == 2 && parents.size(0) == B)) && parents.size(-1) == T,
              "tree_dwconv: parents must be int64 [T] or [B, T] with B, T = ", B, ", ", T, " (v's), got ",
              parents.scalar_type(), " ", parents.sizes());
  TORCH_CHECK(conv_tail.scalar_type() == s && weight.scalar_type() == s,
              "tree_dwconv: conv_tail and weight must have v's dtype (", s, "), got ", conv_tail.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(conv_tail.device() == dev && parents.device() == dev && weight.device() == dev,
              "tree_dwconv: conv_tail, parents and weight must be on v's device ", dev);
  check_vector(bias, "tree_dwconv: bias", D, "D", v, "v");
  if (dev.is_cpu()) {  // the values (a GPU check would synchronize)
    const at::Tensor p = parents.contiguous();
    const int64_t* pp = p.const_data_ptr<int64_t>();
    const int64_t rows = parents.dim() == 2 ? B : 1;
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t par = pp[b * T + i];
        TORCH_CHECK(par >= -1 && par < i && (i > 0 || par == -1), "tree_dwconv: parents[", b, ", ", i, "] = ", par,
                    " is not a parent (node 0 is the root with parent -1; -1 <= parents[i] < i)");
      }
  }
}

}  // namespace leanformer
