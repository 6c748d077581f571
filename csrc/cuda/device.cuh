// What every csrc/cuda/<family>_kernels.cuh includes: the CUDA device API, cub's block
// collectives, c10's Half / BFloat16 (header-only), CUDA_KERNEL_ASSERT and opmath_t. In a CUDA
// build that is nvcc's; in the emulation build (LEANFORMER_EMU) the same names come from
// emu/cuda_emu.h over the HIP CPU Runtime, so the kernels compile unchanged for both.
// Kernel headers include nothing from ATen or torch: pointers, sizes and strides in.
#pragma once

#if defined(LEANFORMER_EMU)
#include "emu/cuda_emu.h"
#include "emu/cub_emu.h"
#else
#include <cuda_runtime.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
// Dynamic shared memory, spelled so that the emulation can define it too.
#define LF_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define LF_DYNAMIC_SHARED_ALIGNED(type, name, align) extern __shared__ __align__(align) type name[]
#endif

#include <cstdint>
#include <type_traits>

namespace leanformer {

// The type arithmetic runs in: float for the 16-bit types, the type itself otherwise (as
// at::opmath_type, without ATen).
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

}  // namespace leanformer
