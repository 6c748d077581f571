// The torch side of the CUDA launchers (csrc/cuda/<family>_cuda.cu), written once for the CUDA
// build and the emulation build (LEANFORMER_EMU, csrc/cuda/emu/), so that the emulation runs
// the launchers themselves: their checks, allocations, dispatch and launch sequence.
//   DeviceGuard, current_stream(), device_properties(): CUDA's, or the emulation's (a no-op
//       guard, a null stream, the properties of an H100: 132 SMs, 227 KB of shared memory).
//   launch_kernel(kernel, grid, block, smem, stream, args...): kernel<<<...>>>(args...) and
//       the launch check; in the emulation a synchronous run on the CPU that raises a
//       device-side assert as an error.
//   set_max_dynamic_shared_memory(kernel, bytes): cudaFuncSetAttribute for > 48 KB.
//   LEANFORMER_CUDA_LIBRARY_IMPL(m): TORCH_LIBRARY_IMPL(leanformer, CUDA, m), or the
//       emulation's namespace, TORCH_LIBRARY_IMPL(leanformer_emu, CPU, m).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstddef>
#include <utility>

#if defined(LEANFORMER_EMU)
#include "device.cuh"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace leanformer {

#if defined(LEANFORMER_EMU)

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
struct EmulatedDeviceProperties {
  int multiProcessorCount = 132;
  std::size_t sharedMemPerBlockOptin = 227 * 1024;
};
inline const EmulatedDeviceProperties& device_properties() {
  static const EmulatedDeviceProperties props;
  return props;
}
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t,
                   Args&&... args) {
  emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
}
template <typename... Params>
void set_max_dynamic_shared_memory(void (*)(Params...), std::size_t) {}
#define LEANFORMER_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(leanformer_emu, CPU, m)

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline const cudaDeviceProp& device_properties() { return *at::cuda::getCurrentDeviceProperties(); }
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
template <typename... Params>
void set_max_dynamic_shared_memory(void (*kernel)(Params...), std::size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}
#define LEANFORMER_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(leanformer, CUDA, m)

#endif

}  // namespace leanformer
