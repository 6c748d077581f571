// Argument checks of the quantized_linear family: x [..., K] (float32, float16 or bfloat16, K a
// multiple of 32) times a block-quantized weight in the packed layout of
// python/leanformer/reference/quantized_linear.py (docs/quantized_linear.md): qweight uint8
// [T, K/32, 16 * 32 * bits / 8] (T = ceil(N/16) tiles of 16 outputs), scales and mins float16
// [T, K/32, 16] (mins absent for the symmetric forms), bias [N]. The CPU, CUDA and Meta kernels
// share these (written on symbolic sizes, csrc/checks.h).
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace leanformer {

constexpr int64_t kQuantBlock = 32;  // inputs per block (one scale, one minimum)
constexpr int64_t kQuantTile = 16;   // outputs per tile of the packed layout

// Bytes of one tile's block of codes: 16 outputs x 32 inputs x bits / 8.
inline int64_t quant_tile_bytes(int64_t bits) { return kQuantTile * kQuantBlock * bits / 8; }

inline void check_quantized_linear_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                          const std::optional<at::Tensor>& mins,
                                          const std::optional<at::Tensor>& bias, int64_t bits, int64_t out_features) {
  check_not_scalar(x, "quantized_linear: x", "[..., K]");
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
              "quantized_linear: x must be float32, float16 or bfloat16, got ", s);
  TORCH_CHECK(bits == 4 || bits == 8, "quantized_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(out_features >= 0, "quantized_linear: out_features must be >= 0, got ", out_features);
  const c10::SymInt K = x.sym_size(-1);
  TORCH_SYM_CHECK((K % kQuantBlock).sym_eq(0), "quantized_linear: x.shape[-1] = K = ", K,
                  " must be a multiple of the block size 32");
  const c10::SymInt KB = K / kQuantBlock;
  const int64_t nbytes = quant_tile_bytes(bits);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "quantized_linear: qweight must be uint8, got ",
              qweight.scalar_type());
  check_same_device(qweight, "quantized_linear: qweight", x, "x");
  TORCH_CHECK(qweight.dim() == 3, "quantized_linear: qweight must be [ceil(N/16), K/32, ", nbytes, "] for ", bits,
              "-bit codes (see leanformer.quant.BlockQuantizedMatrix), got ", qweight.sym_sizes());
  const c10::SymInt T = qweight.sym_size(0);
  TORCH_SYM_CHECK(qweight.sym_size(1).sym_eq(KB) & qweight.sym_size(2).sym_eq(nbytes),
                  "quantized_linear: qweight must be [ceil(N/16), K/32, ", nbytes, "] = [*, ", KB, ", ", nbytes,
                  "] for ", bits, "-bit codes and K = x.shape[-1] = ", K, ", got ", qweight.sym_sizes());
  TORCH_SYM_CHECK(((T - 1) * kQuantTile).sym_lt(out_features) & (T * kQuantTile).sym_ge(out_features),
                  "quantized_linear: out_features = ", out_features, " does not fit qweight's ", T,
                  " tiles of 16 outputs (it must be in (", (T - 1) * kQuantTile, ", ", T * kQuantTile, "])");
  const c10::SymInt want[3] = {T, KB, kQuantTile};
  auto check_params = [&](const at::Tensor& p, const char* name) {
    TORCH_CHECK(p.scalar_type() == at::kHalf, "quantized_linear: ", name, " must be float16, got ", p.scalar_type());
    check_same_device(p, name, x, "x");
    TORCH_SYM_CHECK(sym_sizes_eq(p.sym_sizes(), want), "quantized_linear: ", name,
                    " must be [ceil(N/16), K/32, 16] = [", T, ", ", KB, ", 16], got ", p.sym_sizes());
  };
  check_params(scales, "scales");
  if (mins.has_value()) check_params(*mins, "mins");
  check_vector(bias, "quantized_linear: bias", out_features, "out_features", x, "x");
}

}  // namespace leanformer
