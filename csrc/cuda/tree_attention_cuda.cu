// CUDA kernels of tree attention (softmax over [cached prefix + token tree]) and of tree linear
// attention (prefix state + ancestors). NOTE: compiled and resource-checked with ptxas; the
// index math was emulated in Python on the CPU; never yet run on a GPU.
//
// tree_attention, flash-decoding style. The keys of sequence b are the virtual range
// [0, L_b + T): the first L_b = cache_lens[b] are cache slots (unmasked), the last T are tree
// nodes (masked by tree_mask). The range is cut into chunks of chunk_len keys; a block owns one
// (chunk, b, kv head, tile of rows), where a row is one (tree node t, GQA query head g), row =
// t * G + g, so the G query heads of a node are adjacent in q. Every warp owns kRowsPerWarp rows.
// Per tile of 32 keys staged in shared memory (fp32, fp64 for fp64), lane j scores key j against
// the warp's rows, the online softmax runs in base 2 (the scale folded with log2(e) into q),
// and the lanes then own the output columns for p @ V. Each block writes its normalized
// partial output and log2-sum-exp; tree_attention_merge combines the chunks by LSE. Chunks
// starting past L_b + T are skipped by both kernels (per-sequence lengths stay on the device).
// There is no [T, L + T] mask anywhere: tree_mask is read only for keys past L_b.
//
// tree_linear_attention: one warp per (b, h, node). The lanes find the node's ancestors with a
// ballot over its tree_mask row, accumulate phi(q).phi(k_j) v_j for each, then add the prefix
// state phi(q) S and normalize. Trees are small (T <= a few hundred), so this is latency bound.
#include "../tree_attention_checks.h"
#include "launch.h"
#include "tree_attention_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace leanformer {
namespace {

template <typename scalar_t>
Strided4<scalar_t> strided4(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Calls f(kD, kDvPerLane) with the instantiation for (D, Dv): 64 and 128 (D == Dv) are
// specialized, the rest take the generic path with the fewest output registers.
template <typename F>
void with_head_dims(int D, int Dv, F&& f) {
  if (D == 64 && Dv == 64) return f(std::integral_constant<int, 64>{}, std::integral_constant<int, 2>{});
  if (D == 128 && Dv == 128)
    return f(std::integral_constant<int, 128>{}, std::integral_constant<int, 4>{});
  if (Dv <= 32) return f(std::integral_constant<int, 0>{}, std::integral_constant<int, 1>{});
  if (Dv <= 64) return f(std::integral_constant<int, 0>{}, std::integral_constant<int, 2>{});
  if (Dv <= 128) return f(std::integral_constant<int, 0>{}, std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 0>{}, std::integral_constant<int, 8>{});
}

// Keys per chunk: enough chunks that the grid has ~4 blocks per SM, at least kMinChunk keys
// each, a multiple of the key tile.
int64_t choose_chunk_len(int64_t keys, int64_t blocks_per_chunk) {
  const int64_t sms = device_properties().multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + blocks_per_chunk - 1) / blocks_per_chunk);
  int64_t len = (keys + wanted - 1) / wanted;
  len = (len + kKeyTile - 1) / kKeyTile * kKeyTile;
  return std::max(len, kMinChunk);
}

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const at::Tensor& k_tree, const at::Tensor& v_tree,
                               const at::Tensor& tree_mask, std::optional<double> scale) {
  check_tree_attention_inputs(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask);
  const DeviceGuard device_guard(q.device());
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t L_max = k_cache.size(1), Hkv = k_cache.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(D <= kMaxHeadDim && Dv <= kMaxHeadDim, "tree_attention on CUDA supports head dims "
              "up to ", kMaxHeadDim, ", got D = ", D, " (q.shape[3]) and Dv = ", Dv,
              " (v_cache.shape[3])");
  at::Tensor out = at::empty({B, T, Hq, Dv}, q.options());
  if (out.numel() == 0) return out;
  const int64_t G = Hq / Hkv, R = G * T;
  TORCH_CHECK(B * Hkv <= kMaxGridYZ, "tree_attention on CUDA: batch * kv heads must be at most ",
              kMaxGridYZ, ", got ", B * Hkv);
  TORCH_CHECK(R < (int64_t(1) << 31) && T * Hq < (int64_t(1) << 31),
              "tree_attention on CUDA: too many tree nodes x heads");

  const at::Tensor qc = q.contiguous(), ktc = k_tree.contiguous(), vtc = v_tree.contiguous();
  const at::Tensor maskc = tree_mask.contiguous(), lensc = cache_lens.contiguous();
  const double scale_v = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr int RB = rows_per_warp<acc_t>() * kWarps;
    const int64_t row_tiles = (R + RB - 1) / RB;
    TORCH_CHECK(row_tiles <= kMaxGridYZ, "tree_attention on CUDA: too many tree nodes x heads (",
                R, " rows per kv head)");
    const int64_t chunk_len = choose_chunk_len(L_max + T, B * Hkv * row_tiles);
    const int64_t chunks = (L_max + T + chunk_len - 1) / chunk_len;
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor o_part = at::empty({chunks, B, Hkv, R, Dv}, acc_opts);
    at::Tensor lse_part = at::empty({chunks, B, Hkv, R}, acc_opts);

    TreeAttentionParams<scalar_t, acc_t> prm;
    prm.q = qc.data_ptr<scalar_t>();
    prm.k_cache = strided4<scalar_t>(k_cache);
    prm.v_cache = strided4<scalar_t>(v_cache);
    prm.cache_lens = lensc.data_ptr<int64_t>();
    prm.k_tree = ktc.data_ptr<scalar_t>();
    prm.v_tree = vtc.data_ptr<scalar_t>();
    prm.mask = maskc.data_ptr<bool>();
    prm.mask_sb = maskc.dim() == 3 ? T * T : 0;
    prm.o_part = o_part.data_ptr<acc_t>();
    prm.lse_part = lse_part.data_ptr<acc_t>();
    prm.B = B, prm.T = T, prm.Hq = Hq, prm.Hkv = Hkv, prm.G = G, prm.D = D, prm.Dv = Dv;
    prm.L_max = L_max;
    prm.chunk_len = chunk_len;
    prm.scale_log2 = static_cast<acc_t>(scale_v * M_LOG2E);

    with_head_dims(D, Dv, [&](auto kd, auto dvpl) {
      constexpr int kD = decltype(kd)::value, kDvPerLane = decltype(dvpl)::value;
      auto kernel = tree_attention_partial_kernel<scalar_t, acc_t, kD, kDvPerLane>;
      const size_t smem = tile_layout(D, kDvPerLane, RB).total() * sizeof(acc_t);
      const size_t smem_max = device_properties().sharedMemPerBlockOptin;
      TORCH_CHECK(smem <= smem_max, "tree_attention on CUDA: head dims D = ", D, ", Dv = ", Dv,
                  " in ", q.scalar_type(), " need ", smem, " bytes of shared memory, the device "
                  "allows ", smem_max);
      if (smem > 48 * 1024) {
        set_max_dynamic_shared_memory(kernel, smem);
      }
      const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(B * Hkv),
                      static_cast<unsigned>(row_tiles));
      launch_kernel(kernel, grid, kThreads, smem, stream, prm);
    });
    const int64_t out_rows = B * T * Hq;
    launch_kernel(tree_attention_merge_kernel<scalar_t, acc_t>,
                  static_cast<unsigned>((out_rows + kWarps - 1) / kWarps), kThreads, 0, stream, prm.o_part,
                  prm.lse_part, prm.cache_lens, out.data_ptr<scalar_t>(), B, T, Hq, Hkv, G, Dv, chunk_len);
  });
  return out;
}

at::Tensor tree_linear_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& S,
                                      const at::Tensor& z, const at::Tensor& tree_mask,
                                      double eps) {
  check_tree_linear_attention_inputs(q, k, v, S, z, tree_mask);
  const DeviceGuard device_guard(q.device());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Dv = v.size(3);
  at::Tensor out = at::empty({B, T, H, Dv}, q.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(B * H < (int64_t(1) << 31) && (T + kWarps - 1) / kWarps <= kMaxGridYZ,
              "tree_linear_attention on CUDA: too many sequences x heads or tree nodes");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor Sc = S.contiguous(), zc = z.contiguous(), maskc = tree_mask.contiguous();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "tree_linear_attention_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const size_t smem = static_cast<size_t>(kWarps) * Dk * sizeof(acc_t);
    const size_t smem_max = device_properties().sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= smem_max, "tree_linear_attention on CUDA: Dk = ", Dk, " is too large");
    auto kernel = tree_linear_attention_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {
      set_max_dynamic_shared_memory(kernel, smem);
    }
    const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((T + kWarps - 1) / kWarps));
    launch_kernel(kernel, grid, kThreads, smem, stream, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                  vc.data_ptr<scalar_t>(), Sc.data_ptr<acc_t>(), zc.data_ptr<acc_t>(),
                  maskc.data_ptr<bool>(), maskc.dim() == 3 ? T * T : 0, out.data_ptr<scalar_t>(), B, T, H,
                  Dk, Dv, static_cast<acc_t>(eps));
  });
  return out;
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("tree_linear_attention", &tree_linear_attention_cuda);
}

}  // namespace leanformer
