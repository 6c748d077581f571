// Argument checks of the top-k sparse MLP ops (topk_activation, sparse_down_projection,
// topk_mlp and their backward ops), shared by every backend, plus the few scalar helpers
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

inline void check_k(int64_t k, int64_t d_ff) {
  TORCH_CHECK(k >= 0 && k <= d_ff, "k must be in [0, d_ff] = [0, ", d_ff, "], got ", k);
  // Ranks pack the index into 32 bits.
  TORCH_CHECK(d_ff < std::numeric_limits<int32_t>::max(), "d_ff must be below 2^31, got ", d_ff);
}

// Rows of h [..., d_ff] -> (rows, d_ff).
inline void check_topk_activation_inputs(const at::Tensor& h, int64_t k) {
  check_not_scalar(h, "h", "[..., d_ff]");
  check_floating(h, "h");
  check_k(k, h.size(-1));
}

// values [..., k] and indices [..., k] (int64) selecting rows of a table [d_ff, d_model].
inline void check_selection(const at::Tensor& values, const at::Tensor& indices,
                            const at::Tensor& table, const char* table_name) {
  check_not_scalar(values, "values", "[..., k]");
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices must have the shape of values ",
              values.sizes(), ", got ", indices.sizes());
  check_int64_on(indices, "indices", values, "values");
  TORCH_CHECK(table.dim() == 2, table_name, " must be [d_ff, d_model], got shape ", table.sizes());
  TORCH_CHECK(values.size(-1) <= table.size(0), "values must have at most d_ff = ",
              table.size(0), " (", table_name, ".shape[0]) entries per row, got k = ",
              values.size(-1));
  check_floating(values, "values");
  check_like(table, table_name, values, "values");
}

inline void check_sparse_down_projection_inputs(const at::Tensor& values,
                                                const at::Tensor& indices,
                                                const at::Tensor& w_down_t,
                                                const std::optional<at::Tensor>& bias) {
  check_selection(values, indices, w_down_t, "w_down_t");
  check_vector(bias, "bias", w_down_t.size(1), "d_model", values, "values");
}

// Per-element check of the kernels (they read the indices anyway; a separate min/max pass
// would cost more than the gather at decode sizes).
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
                                  const std::optional<at::Tensor>& b_down, int64_t k) {
  check_not_scalar(x, "x", "[..., d_model]");
  check_floating(x, "x");
  const int64_t d_model = x.size(-1);
  TORCH_CHECK(w_up.dim() == 2 && w_up.size(1) == d_model, "w_up must be [d_ff, d_model] with d_model = ",
              d_model, " (x.shape[-1]), got ", w_up.sizes());
  const int64_t d_ff = w_up.size(0);
  TORCH_CHECK(w_down_t.dim() == 2 && w_down_t.size(0) == d_ff && w_down_t.size(1) == d_model,
              "w_down_t must be [d_ff, d_model] = [", d_ff, ", ", d_model,
              "] (the transpose of the down projection's weight), got ", w_down_t.sizes());
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
  TORCH_CHECK(indices.dim() == x.dim() &&
                  indices.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "indices must be [..., k] with the leading dims of x ", x.sizes(), ", got ",
              indices.sizes());
  check_int64_on(indices, "indices", x, "x");
  const int64_t k = indices.dim() ? indices.size(-1) : 0;
  TORCH_CHECK(w_up.dim() != 2 || k <= w_up.size(0), "indices must have at most d_ff = ",
              w_up.size(0), " (w_up.shape[0]) entries per row, got k = ", k);
  check_topk_mlp_inputs(x, w_up, b_up, w_down_t, b_down, k);
}

inline void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(grad.sizes() == shape, name, " must have shape ", shape, ", got ", grad.sizes());
  check_like(grad, name, ref, ref_name);
}

}  // namespace leanformer
