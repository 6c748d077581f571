// Argument checks of the N:M sparse linear ops (nm_sparse_linear and its backward), shared by
// every backend (CPU, CUDA, Meta), plus the layout helpers the backends need. The packed layout
// is documented in python/leanformer/sparse/nm_format.py: values [rows, K/m*n], meta int32 [rows, W] with
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

// The same on symbolic sizes (the checks run on fake tensors too).
inline c10::SymInt nm_meta_words_sym(const c10::SymInt& num_values, int64_t m) {
  return (num_values * nm_meta_bits(m) + 31) / 32;
}

// x [..., K], values [rows, K/m*n] (x's dtype and device), meta int32 [rows, W], bias [rows].
// Written on symbolic sizes (csrc/checks.h): the Meta kernels run them too. The metadata's
// values (in-group indices below m) are checked by the real kernels.
inline void check_nm_sparse_linear_inputs(const at::Tensor& x, const at::Tensor& values,
                                          const at::Tensor& meta,
                                          const std::optional<at::Tensor>& bias, int64_t n,
                                          int64_t m) {
  check_nm_pattern(n, m);
  check_not_scalar(x, "x", "[..., K]");
  check_floating(x, "x");
  const c10::SymInt K = x.sym_size(-1);
  TORCH_SYM_CHECK((K % m).sym_eq(0), "x.shape[-1] (K = ", K, ") must be a multiple of m = ", m);
  const c10::SymInt V = K / m * n;
  TORCH_CHECK(values.dim() == 2, "values must be [rows, K/m*n] = [rows, ", V, "] for K = ", K,
              " (x.shape[-1]) and ", n, ":", m, ", got ", values.sym_sizes());
  TORCH_SYM_CHECK(values.sym_size(1).sym_eq(V), "values must be [rows, K/m*n] = [rows, ", V, "] for K = ", K,
                  " (x.shape[-1]) and ", n, ":", m, ", got ", values.sym_sizes());
  check_like(values, "values", x, "x");
  const c10::SymInt rows = values.sym_size(0), W = nm_meta_words_sym(V, m);
  TORCH_CHECK(meta.scalar_type() == at::kInt, "meta must be int32, got ", meta.scalar_type());
  const c10::SymInt want_meta[2] = {rows, W};
  TORCH_SYM_CHECK(sym_sizes_eq(meta.sym_sizes(), want_meta), "meta must be int32 [rows, ceil(K/m*n * ",
                  nm_meta_bits(m), " / 32)] = [", rows, ", ", W, "] for values ", values.sym_sizes(), " and ", n,
                  ":", m, ", got ", meta.sym_sizes());
  check_same_device(meta, "meta", x, "x");
  check_vector(bias, "bias", rows, "rows", x, "x");
}

// The forward's checks, plus grad_y [..., rows] with x's leading dims, dtype and device.
inline void check_nm_sparse_linear_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& values,
                                                   const at::Tensor& meta, int64_t n, int64_t m) {
  check_nm_sparse_linear_inputs(x, values, meta, std::nullopt, n, m);
  TORCH_CHECK(grad_y.dim() == x.dim(), "grad_y must be [..., rows] with the leading dims of x ", x.sym_sizes(),
              " and rows = ", values.sym_size(0), ", got ", grad_y.sym_sizes());
  TORCH_SYM_CHECK(sym_sizes_eq(grad_y.sym_sizes(), with_last_size(x.sym_sizes(), values.sym_size(0))),
                  "grad_y must be [..., rows] with the leading dims of x ", x.sym_sizes(), " and rows = ",
                  values.sym_size(0), ", got ", grad_y.sym_sizes());
  check_like(grad_y, "grad_y", x, "x");
}

}  // namespace leanformer
