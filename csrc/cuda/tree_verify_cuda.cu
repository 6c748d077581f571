// The launchers of tree verification and KV cache compaction (the kernels and their launch
// geometry: tree_verify_kernels.cuh): checks, allocation, dtype dispatch and the launch sequence
// on the current stream. compact_kv_cache advances cache_lens with an op on the same stream
// after both compactions, once every block has read the old length. Compiled by nvcc, and by
// the emulation build, where the same launchers run the kernels on the CPU (launch.h).
#include "../tree_verify_checks.h"
#include "launch.h"
#include "tree_verify_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace leanformer {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& scores,
                                                              int64_t B, int64_t T) {
  const auto opts = scores.options().dtype(at::kLong);
  return {at::empty({B, T}, opts), at::empty({B}, opts), at::empty({B}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& tree_tokens,
                                                                       const at::Tensor& parents) {
  const TreeVerifyShape s = check_tree_verify_inputs(logits, "logits", tree_tokens, parents);
  const DeviceGuard device_guard(logits.device());
  auto [accepted, num_accepted, bonus] = verify_outputs(logits, s.B, s.T);
  if (s.B == 0) return {accepted, num_accepted, bonus};
  const at::Tensor lc = logits.contiguous(), tc = tree_tokens.contiguous(), pc = parents.contiguous();
  at::Tensor argmax = at::empty({s.B, s.T}, accepted.options());
  const cudaStream_t stream = current_stream();
  TORCH_CHECK(s.B * s.T < (int64_t(1) << 31), "verify_tree_greedy on CUDA: too many nodes");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "verify_tree_greedy_cuda", [&] {
    launch_kernel(tree_argmax_kernel<scalar_t>, static_cast<unsigned>(s.B * s.T), kArgmaxThreads, 0, stream,
                  lc.data_ptr<scalar_t>(), s.V, argmax.data_ptr<int64_t>());
  });
  launch_kernel(tree_greedy_walk_kernel, static_cast<unsigned>((s.B + kWalkWarps - 1) / kWalkWarps),
                kWalkWarps * 32, 0, stream, argmax.data_ptr<int64_t>(), tc.data_ptr<int64_t>(),
                pc.data_ptr<int64_t>(), s.batched_parents ? s.T : 0, s.B, s.T, accepted.data_ptr<int64_t>(),
                num_accepted.data_ptr<int64_t>(), bonus.data_ptr<int64_t>());
  return {accepted, num_accepted, bonus};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_sampling_cuda(
    const at::Tensor& probs, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& uniforms) {
  const TreeVerifyShape s = check_verify_tree_sampling_inputs(probs, tree_tokens, parents, uniforms);
  const DeviceGuard device_guard(probs.device());
  auto [accepted, num_accepted, bonus] = verify_outputs(probs, s.B, s.T);
  if (s.B == 0) return {accepted, num_accepted, bonus};
  TORCH_CHECK(s.B < (int64_t(1) << 31), "verify_tree_sampling on CUDA: too many sequences");
  const at::Tensor pc = probs.contiguous(), tc = tree_tokens.contiguous();
  const at::Tensor parc = parents.contiguous(), uc = uniforms.contiguous();
  const size_t smem = static_cast<size_t>(s.T) * sizeof(int64_t);
  TORCH_CHECK(smem <= 48 * 1024, "verify_tree_sampling on CUDA supports trees of up to ",
              48 * 1024 / sizeof(int64_t), " nodes, got T = ", s.T);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(),
                                  "verify_tree_sampling_cuda", [&] {
    launch_kernel(tree_sampling_kernel<scalar_t>, static_cast<unsigned>(s.B), kSampleThreads, smem, stream,
                  pc.data_ptr<scalar_t>(), s.T, s.V, tc.data_ptr<int64_t>(), parc.data_ptr<int64_t>(),
                  s.batched_parents ? s.T : 0, uc.data_ptr<float>(), uc.size(1),
                  accepted.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(),
                  bonus.data_ptr<int64_t>());
  });
  return {accepted, num_accepted, bonus};
}

template <typename elem_t>
void launch_compact(const at::Tensor& cache, const at::Tensor& cache_lens, const at::Tensor& accepted,
                    const at::Tensor& num_accepted, cudaStream_t stream) {
  const int64_t B = cache.size(0), L_max = cache.size(1), H = cache.size(2), C = cache.size(3);
  if (B == 0 || H * C == 0) return;
  TORCH_CHECK(B <= 65535, "compact_kv_cache on CUDA: batch must be at most 65535, got ", B);
  const dim3 grid(static_cast<unsigned>((H * C + kCompactThreads - 1) / kCompactThreads),
                  static_cast<unsigned>(B));
  launch_kernel(compact_cache_kernel<elem_t>, grid, kCompactThreads, 0, stream,
                static_cast<elem_t*>(cache.data_ptr()), cache.stride(0), cache.stride(1), cache.stride(2),
                cache.stride(3), H, C, L_max, cache_lens.data_ptr<int64_t>(), accepted.data_ptr<int64_t>(),
                num_accepted.data_ptr<int64_t>(), accepted.size(1));
}

void compact_one_cache(const at::Tensor& cache, const at::Tensor& cache_lens,
                       const at::Tensor& accepted, const at::Tensor& num_accepted,
                       cudaStream_t stream) {
  switch (cache.element_size()) {
    case 1: return launch_compact<uint8_t>(cache, cache_lens, accepted, num_accepted, stream);
    case 2: return launch_compact<uint16_t>(cache, cache_lens, accepted, num_accepted, stream);
    case 4: return launch_compact<uint32_t>(cache, cache_lens, accepted, num_accepted, stream);
    case 8: return launch_compact<uint64_t>(cache, cache_lens, accepted, num_accepted, stream);
    default:
      TORCH_CHECK(false, "compact_kv_cache on CUDA: unsupported element size ",
                  cache.element_size(), " of ", cache.scalar_type());
  }
}

void compact_kv_cache_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cache_lens, const at::Tensor& accepted,
                           const at::Tensor& num_accepted) {
  check_compact_kv_cache_inputs(k_cache, v_cache, cache_lens, accepted, num_accepted);
  // Written in place: refuse an expanded cache or cache_lens (elements sharing memory), as the CPU
  // kernel does; its blocks would race on the shared slots.
  at::assert_no_internal_overlap(k_cache);
  at::assert_no_internal_overlap(v_cache);
  at::assert_no_internal_overlap(cache_lens);
  const DeviceGuard device_guard(k_cache.device());
  const cudaStream_t stream = current_stream();
  const at::Tensor acc = accepted.contiguous(), num = num_accepted.contiguous();
  // The kernels read cache_lens; it is advanced in place only after both (stream order).
  const at::Tensor lens = cache_lens.contiguous();
  compact_one_cache(k_cache, lens, acc, num, stream);
  compact_one_cache(v_cache, lens, acc, num, stream);
  cache_lens.add_(num);
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) {
  m.impl("verify_tree_greedy", &verify_tree_greedy_cuda);
  m.impl("verify_tree_sampling", &verify_tree_sampling_cuda);
  m.impl("compact_kv_cache", &compact_kv_cache_cuda);
}

}  // namespace leanformer
