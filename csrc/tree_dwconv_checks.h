// Argument checks of tree_dwconv, shared by the CPU and CUDA implementations: v [B, T, H, D]
// (any strides), conv_tail [B*H, D, W] (the causal conv's last W values of V before the tree,
// oldest first), parents int64 [T] or [B, T] (parents[0] = -1, -1 <= parents[i] < i),
// weight [D, W + 1] (the depthwise Conv1d's taps, shared by the heads), bias [D] or none; all
// floating tensors in v's dtype.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

namespace leanformer {

inline void check_tree_dwconv_inputs(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(v.dim() == 4, "tree_dwconv: v must be [B, T, H, D], got ", v.sizes());
  const auto s = v.scalar_type();
  TORCH_CHECK(at::isFloatingType(s), "tree_dwconv: v must be a floating tensor, got ", s);
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
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == D, "tree_dwconv: bias must be [D] = [", D, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == s && bias->device() == dev, "tree_dwconv: bias must be ", s, " on ", dev,
                " (v's), got ", bias->scalar_type(), " on ", bias->device());
  }
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
