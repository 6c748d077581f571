// Argument checks of the top-k sparse MLP ops (topk_activation, sparse_down_projection,
// topk_mlp and their backward ops), shared by every backend (CPU, CUDA, Meta), plus the few scalar helpers
// both backends need: the activation, and the total order that makes the selection
// deterministic.
#pragma once

#include "checks.h"
#include "topk_mlp_order_key.h"

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

namespace leanformer {

// kIdentity is internal: the kernels select on already activated values (GELU is applied by
// at::gelu first, so the ranking sees exactly F.gelu's values).
enum class Activation { kRelu, kGelu, kIdentity };

inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  TORCH_CHECK(false, "activation must be \"relu\" or \"gelu\", got \"", std::string(name), "\"");
}

// The checks are written on symbolic sizes (csrc/checks.h): the Meta kernels run them too.

inline void check_k(const c10::SymInt& k, const c10::SymInt& d_ff) {
  TORCH_SYM_CHECK(k.sym_ge(0) & k.sym_le(d_ff), "k must be in [0, d_ff] = [0, ", d_ff, "], got ", k);
  // Ranks pack the index into 32 bits.
  TORCH_SYM_CHECK(d_ff.sym_lt(std::numeric_limits<int32_t>::max()), "d_ff must be below 2^31, got ", d_ff);
}

// Rows of h [..., d_ff] -> (rows, d_ff).
inline void check_topk_activation_inputs(const at::Tensor& h, const c10::SymInt& k) {
  check_not_scalar(h, "h", "[..., d_ff]");
  check_floating(h, "h");
  check_k(k, h.sym_size(-1));
}

// grad (a gradient) has the given shape and ref's dtype and device.
inline void check_grad(const at::Tensor& grad, const char* name, c10::SymIntArrayRef shape,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_SYM_CHECK(sym_sizes_eq(grad.sym_sizes(), shape), name, " must have shape ", shape, ", got ",
                  grad.sym_sizes());
  check_like(grad, name, ref, ref_name);
}

// topk_activation_backward: h [..., d_ff], indices int64 [..., k] (h's leading dims, k <= d_ff),
// grad_values [..., k] like h.
inline void check_topk_activation_backward_inputs(const at::Tensor& grad_values, const at::Tensor& h,
                                                  const at::Tensor& indices) {
  check_not_scalar(h, "h", "[..., d_ff]");
  TORCH_CHECK(indices.dim() == h.dim(), "indices must be [..., k] with the leading dims of h ", h.sym_sizes(),
              ", got ", indices.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(leading_sizes(indices), leading_sizes(h)),
                  "indices must be [..., k] with the leading dims of h ", h.sym_sizes(), ", got ",
                  indices.sym_sizes());
  check_topk_activation_inputs(h, indices.sym_size(-1));
  check_int64_on(indices, "indices", h, "h");
  check_grad(grad_values, "grad_values", indices.sym_sizes(), h, "h");
}

// values [..., k] and indices [..., k] (int64) selecting rows of a table [d_ff, d_model]; values
// is named values_name in the messages.
inline void check_selection(const at::Tensor& values, const char* values_name, const at::Tensor& indices,
                            const at::Tensor& table, const char* table_name) {
  check_not_scalar(values, values_name, "[..., k]");
  TORCH_SYM_CHECK(sym_sizes_eq(indices.sym_sizes(), values.sym_sizes()), "indices must have the shape of ",
                  values_name, " ", values.sym_sizes(), ", got ", indices.sym_sizes());
  check_int64_on(indices, "indices", values, values_name);
  TORCH_CHECK(table.dim() == 2, table_name, " must be [d_ff, d_model], got shape ", table.sym_sizes());
  TORCH_SYM_CHECK(values.sym_size(-1).sym_le(table.sym_size(0)), values_name, " must have at most d_ff = ",
                  table.sym_size(0), " (", table_name, ".shape[0]) entries per row, got k = ",
                  values.sym_size(-1));
  check_floating(values, values_name);
  check_like(table, table_name, values, values_name);
}

inline void check_sparse_down_projection_inputs(const at::Tensor& values,
                                                const at::Tensor& indices,
                                                const at::Tensor& w_down_t,
                                                const std::optional<at::Tensor>& bias) {
  check_selection(values, "values", indices, w_down_t, "w_down_t");
  check_vector(bias, "bias", w_down_t.sym_size(1), "d_model", values, "values");
}

// The forward's checks, plus grad_y [..., d_model] with values' leading dims, like values.
inline void check_sparse_down_projection_backward_inputs(const at::Tensor& grad_y, const at::Tensor& values,
                                                         const at::Tensor& indices, const at::Tensor& w_down_t) {
  check_sparse_down_projection_inputs(values, indices, w_down_t, std::nullopt);
  check_grad(grad_y, "grad_y", with_last_size(values.sym_sizes(), w_down_t.sym_size(1)), values, "values");
}

// Per-element check of the kernels (they read the indices anyway; a separate min/max pass
// would cost more than the gather at decode sizes). A value check: real kernels only.
inline void check_index(int64_t index, int64_t d_ff) {
  TORCH_CHECK(index >= 0 && index < d_ff, "indices must be in [0, d_ff) = [0, ", d_ff,
              "), got ", index);
}

// x [..., d_model], w_up [d_ff, d_model] (nn.Linear's weight), b_up [d_ff],
// w_down_t [d_ff, d_model] (the transpose of the down projection's nn.Linear weight),
// b_down [d_model].
inline void check_topk_mlp_inputs(const at::Tensor& x, const at::Tensor& w_up,
                                  const std::optional<at::Tensor>& b_up,
                                  const at::Tensor& w_down_t,
                                  const std::optional<at::Tensor>& b_down, const c10::SymInt& k) {
  check_not_scalar(x, "x", "[..., d_model]");
  check_floating(x, "x");
  const c10::SymInt d_model = x.sym_size(-1);
  TORCH_CHECK(w_up.dim() == 2, "w_up must be [d_ff, d_model] with d_model = ", d_model,
              " (x.shape[-1]), got ", w_up.sym_sizes());
  TORCH_SYM_CHECK(w_up.sym_size(1).sym_eq(d_model), "w_up must be [d_ff, d_model] with d_model = ", d_model,
                  " (x.shape[-1]), got ", w_up.sym_sizes());
  const c10::SymInt d_ff = w_up.sym_size(0);
  const c10::SymInt want_down[2] = {d_ff, d_model};
  TORCH_SYM_CHECK(sym_sizes_eq(w_down_t.sym_sizes(), want_down), "w_down_t must be [d_ff, d_model] = [", d_ff,
                  ", ", d_model, "] (the transpose of the down projection's weight), got ", w_down_t.sym_sizes());
  check_like(w_up, "w_up", x, "x");
  check_like(w_down_t, "w_down_t", x, "x");
  check_vector(b_up, "b_up", d_ff, "d_ff", x, "x");
  check_vector(b_down, "b_down", d_model, "d_model", x, "x");
  check_k(k, d_ff);
}

// predicted_sparse_mlp: the topk_mlp arguments with k = indices.shape[-1] and indices
// [..., k] int64 (the predicted neurons of each row of x).
inline void check_predicted_sparse_mlp_inputs(const at::Tensor& x, const at::Tensor& w_up,
                                              const std::optional<at::Tensor>& b_up,
                                              const at::Tensor& w_down_t,
                                              const std::optional<at::Tensor>& b_down,
                                              const at::Tensor& indices) {
  check_not_scalar(x, "x", "[..., d_model]");
  TORCH_CHECK(indices.dim() == x.dim(), "indices must be [..., k] with the leading dims of x ", x.sym_sizes(),
              ", got ", indices.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(leading_sizes(indices), leading_sizes(x)),
                  "indices must be [..., k] with the leading dims of x ", x.sym_sizes(), ", got ",
                  indices.sym_sizes());
  check_int64_on(indices, "indices", x, "x");
  const c10::SymInt k = indices.sym_size(-1);
  if (w_up.dim() == 2)
    TORCH_SYM_CHECK(k.sym_le(w_up.sym_size(0)), "indices must have at most d_ff = ", w_up.sym_size(0),
                    " (w_up.shape[0]) entries per row, got k = ", k);
  check_topk_mlp_inputs(x, w_up, b_up, w_down_t, b_down, k);
}

// topk_mlp_backward: the forward's tensors (no biases) with k = indices.shape[-1], h_selected
// [..., k] like x selecting rows of w_up, grad_y like x.
inline void check_topk_mlp_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_up,
                                           const at::Tensor& w_down_t, const at::Tensor& h_selected,
                                           const at::Tensor& indices) {
  check_not_scalar(indices, "indices", "[..., k]");
  const c10::SymInt k = indices.sym_size(-1);
  check_topk_mlp_inputs(x, w_up, std::nullopt, w_down_t, std::nullopt, k);
  check_grad(grad_y, "grad_y", x.sym_sizes(), x, "x");
  check_grad(h_selected, "h_selected", with_last_size(x.sym_sizes(), k), x, "x");
  check_selection(h_selected, "h_selected", indices, w_up, "w_up");
}

}  // namespace leanformer
