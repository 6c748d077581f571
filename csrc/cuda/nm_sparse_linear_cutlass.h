// The 2:4 sparse tensor-core GEMMs (CUTLASS) behind nm_sparse_linear's CUDA forward for more
// than kMaxGemvTokens tokens, one translation unit per architecture:
//   nm_sparse_linear_cutlass_sm80.cu: cutlass::gemm::device::SparseGemm (CUTLASS 2.x), sm_80 and up;
//       our metadata is reordered into its layout by reorder_meta_sm80 (python twin:
//       leanformer/sparse/cutlass_meta.py).
//   nm_sparse_linear_cutlass_sm90.cu: the CUTLASS 3.x OpClassSparseTensorOp collective, sm_90a only;
//       its metadata layout comes from CUTLASS's own compressor run on the decompressed weight.
// Both compute y [T, rows] = x [T, K] @ S^T (+ bias) with S = (values [rows, K/2], meta) in
// our packed 2:4 format, fp16 or bf16, fp32 accumulation; the prepared operands are cached per
// (values, meta) tensor pair (nm_sparse_cutlass_cache.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace leanformer {

// Shape and alignment rules shared by both architectures: rows a multiple of 32 (the sm80
// metadata reorders 32-row groups) and K a multiple of 64 (one K tile of the 16-bit
// metadata ends on a whole ColumnMajorInterleaved<2> column pair; also 16-byte rows of
// values and x).
constexpr int64_t kCutlassRowMultiple = 32;
constexpr int64_t kCutlassKMultiple = 64;

// True when this build has the CUTLASS kernel for `device`'s architecture (sm_8x: sm80;
// sm_90: sm90a, else sm80 when built for 9.0 without the 'a' features).
bool nm24_cutlass_built_for(int device);

// x2d [T, K], values [rows, K/2], meta int32 [rows, K/32], all contiguous on one CUDA device,
// fp16/bf16; bias [rows] or undefined. Call only when nm24_cutlass_built_for(device).
at::Tensor nm24_linear_cutlass(const at::Tensor& x2d, const at::Tensor& values,
                               const at::Tensor& meta, const std::optional<at::Tensor>& bias);

// sm80 pieces, also used by the sm90 file's fallback and exposed for the tests' twin check.
at::Tensor reorder_meta_sm80(const at::Tensor& meta, int64_t K);
at::Tensor nm24_linear_sm80(const at::Tensor& x2d, const at::Tensor& values,
                            const at::Tensor& meta_sm80, const std::optional<at::Tensor>& bias);
// sm90 path (defined only in builds with sm_90a): caches the compressed operands itself.
at::Tensor nm24_linear_sm90(const at::Tensor& x2d, const at::Tensor& values,
                            const at::Tensor& meta, const std::optional<at::Tensor>& bias);
bool nm24_sm90_built();

// Scatter our packed values into a zeroed dense [rows, K] matrix (nm_sparse_linear_cuda.cu).
at::Tensor nm_decompress_cuda(const at::Tensor& values, const at::Tensor& meta, int64_t n,
                              int64_t m, int64_t K);

}  // namespace leanformer
