// Argument checks of the N:M sparse linear ops (nm_sparse_linear and its backward), shared by
// every backend, plus the layout helpers both backends need. The packed layout is documented
// in python/leanformer/sparse/nm_format.py: values [rows, K/m*n], meta int32 [rows, W] with
// nm_meta_bits(m) bits per in-group index, value j at bit (j*bits) % 32 of word (j*bits) / 32,
// LSB first; the column of value j is (j / n) * m + index.
#pragma once

#include "checks.h"
#include "nm_sparse_linear_format.h"

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace leanformer {

inline void check_nm_pattern(int64_t n, int64_t m) {
  TORCH_CHECK(m == 2 || m == 4 || m == 8 || m == 16,
              "N:M pattern: m must be one of 2, 4, 8, 16, got m = ", m);
  TORCH_CHECK(n >= 1 && n < m, "N:M pattern: n must satisfy 1 <= n < m = ", m, ", got n = ", n);
}

// x [..., K], values [rows, K/m*n] (x's dtype and device), meta int32 [rows, W], bias [rows].
inline void check_nm_sparse_linear_inputs(const at::Tensor& x, const at::Tensor& values,
                                          const at::Tensor& meta,
                                          const std::optional<at::Tensor>& bias, int64_t n,
                                          int64_t m) {
  check_nm_pattern(n, m);
  check_not_scalar(x, "x", "[..., K]");
  check_floating(x, "x");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % m == 0, "x.shape[-1] (K = ", K, ") must be a multiple of m = ", m);
  const int64_t V = K / m * n;
  TORCH_CHECK(values.dim() == 2 && values.size(1) == V, "values must be [rows, K/m*n] = [rows, ",
              V, "] for K = ", K, " (x.shape[-1]) and ", n, ":", m, ", got ", values.sizes());
  check_like(values, "values", x, "x");
  const int64_t rows = values.size(0), W = nm_meta_words(V, m);
  TORCH_CHECK(meta.scalar_type() == at::kInt, "meta must be int32, got ", meta.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == rows && meta.size(1) == W,
              "meta must be int32 [rows, ceil(K/m*n * ", nm_meta_bits(m), " / 32)] = [", rows, ", ",
              W, "] for values ", values.sizes(), " and ", n, ":", m, ", got ", meta.sizes());
  check_same_device(meta, "meta", x, "x");
  check_vector(bias, "bias", rows, "rows", x, "x");
}

// The forward's checks, plus grad_y [..., rows] with x's leading dims, dtype and device.
inline void check_nm_sparse_linear_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& values,
                                                   const at::Tensor& meta, int64_t n, int64_t m) {
  check_nm_sparse_linear_inputs(x, values, meta, std::nullopt, n, m);
  TORCH_CHECK(grad_y.dim() == x.dim() &&
                  grad_y.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                  grad_y.size(-1) == values.size(0),
              "grad_y must be [..., rows] with the leading dims of x ", x.sizes(), " and rows = ",
              values.size(0), ", got ", grad_y.sizes());
  check_like(grad_y, "grad_y", x, "x");
}

}  // namespace leanformer
