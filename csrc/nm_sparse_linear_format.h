// The packed N:M layout's index arithmetic (see nm_sparse_linear_checks.h), shared by the CPU
// kernels and the CUDA kernels (torch-free: csrc/cuda/nm_sparse_linear_kernels.cuh includes it).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace leanformer {

// Bits per in-group index: ceil(log2 m) rounded up to a power of two, so no index straddles
// a 32-bit word (1, 2, 4, 4 for m = 2, 4, 8, 16).
C10_HOST_DEVICE inline int nm_meta_bits(int64_t m) { return m == 2 ? 1 : m == 4 ? 2 : 4; }

// int32 metadata words per row for num_values indices.
C10_HOST_DEVICE inline int64_t nm_meta_words(int64_t num_values, int64_t m) {
  return (num_values * nm_meta_bits(m) + 31) / 32;
}

}  // namespace leanformer
