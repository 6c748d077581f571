// CUDA kernels of the top-k sparse MLP ops (the ops themselves are in topk_mlp_ops.h; the up
// projection is cuBLAS through at::linear). NOTE: compiled, resource usage checked with
// ptxas, indexing checked by a CPU emulation; never yet run on a GPU.
//
// select: one block per row, radix select on the order keys of the activation values
// (8 bits per pass, 4 passes for 32-bit keys, 8 for fp64) finds the k-th largest key T and
// how many of the elements equal to T are taken; a last pass walks the row in index order
// and one block scan of packed (greater, equal) counts gives each selected element its output
// slot, so indices come out ascending and ties go to the lowest index. The row is re-read
// from global memory (L1/L2 resident) on every pass instead of being staged in shared memory,
// so any d_ff works with 1 KB of shared memory.
// gather_rows: thread = output column, block = 256 columns of one row; the selected rows of
// the table are read as coalesced 256-column segments. For N <= 8 (decode) the k rows are
// also split over blockIdx.y (a split-k gather GEMV: fp32 partials, then a reduce kernel,
// deterministic) so that the GPU has enough blocks; for larger N each block accumulates all
// k rows of its token (per-row gather accumulation).
// gather_dot: one warp per (token, neuron) pair, lanes over the columns.
// gather_mlp (predicted_sparse_mlp): gather_dot with w_up's rows, a bias + activation kernel,
// gather_rows with w_down_t's rows (two gather GEMVs for small N).
// scatter_rows: atomicAdd into the fp32 (fp64) accumulator; its sum order is not fixed.
// Indices out of [0, d_ff) trip a device-side assert (a host check would need a sync).
#include "../topk_mlp_checks.h"
#include "launch.h"
#include "topk_mlp_kernels.cuh"
#include "../topk_mlp_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace leanformer {
namespace {


struct CudaKernels {
  static at::Tensor up_projection(const at::Tensor& x, const at::Tensor& w_up,
                                  const std::optional<at::Tensor>& b_up) {
    return at::linear(x, w_up, b_up);
  }

  static void select(const at::Tensor& h, int64_t k, Activation act, at::Tensor& values,
                     at::Tensor& indices, at::Tensor pre) {
    const DeviceGuard guard(h.device());
    const cudaStream_t stream = current_stream();
    const int64_t N = h.size(0), d_ff = h.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "topk_select_cuda", [&] {
      scalar_t* pp = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
      auto kernel = act == Activation::kRelu ? topk_select_kernel<scalar_t, true>
                                             : topk_select_kernel<scalar_t, false>;
      launch_kernel(kernel, static_cast<unsigned>(N), kSelectThreads, 0, stream, h.data_ptr<scalar_t>(),
                    d_ff, k, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), pp);
    });
  }

  static void gather_rows(const at::Tensor& v, const at::Tensor& indices, const at::Tensor& table,
                          const at::Tensor& bias, at::Tensor& out) {
    const DeviceGuard guard(v.device());
    const cudaStream_t stream = current_stream();
    const int64_t N = v.size(0), k = v.size(1), d_ff = table.size(0), C = table.size(1);
    const int64_t col_tiles = (C + kColTile - 1) / kColTile;
    // Split k for decode-sized N until there are ~2 blocks per SM, each split >= 32 rows.
    int64_t splits = 1;
    if (N <= kMaxSplitRows) {
      const int64_t sms = device_properties().multiProcessorCount;
      splits = std::clamp<int64_t>((2 * sms + N * col_tiles - 1) / (N * col_tiles), 1,
                                   std::max<int64_t>(1, k / 32));
    }
    const int64_t rows_per_split = std::max<int64_t>(1, (k + splits - 1) / splits);
    splits = std::max<int64_t>(1, (k + rows_per_split - 1) / rows_per_split);
    TORCH_CHECK(N * col_tiles < (int64_t(1) << 31), "sparse_down_projection: too many rows (", N, ")");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "gather_rows_cuda", [&] {
      using acc_t = opmath_t<scalar_t>;
      const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      at::Tensor partial;
      if (splits > 1) partial = at::empty({splits, N, C}, v.options());
      const dim3 grid(static_cast<unsigned>(N * col_tiles), static_cast<unsigned>(splits));
      launch_kernel(gather_rows_kernel<scalar_t, acc_t>, grid, kColTile, 0, stream, v.data_ptr<acc_t>(),
                    indices.data_ptr<int64_t>(), N, k, table.data_ptr<scalar_t>(), d_ff, C, col_tiles,
                    rows_per_split, bp,
                    splits > 1 ? partial.data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>());
      if (splits > 1) {
        launch_kernel(reduce_splits_kernel<scalar_t, acc_t>, blocks_for(N * C, 256), 256, 0, stream,
                      partial.data_ptr<acc_t>(), splits, N * C, C, bp, out.data_ptr<scalar_t>());
      }
    });
  }

  static void gather_dot(const at::Tensor& g, const at::Tensor& indices, const at::Tensor& table,
                         at::Tensor& out) {
    const DeviceGuard guard(g.device());
    const cudaStream_t stream = current_stream();
    const int64_t pairs = indices.numel(), k = indices.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "gather_dot_cuda", [&] {
      using acc_t = opmath_t<scalar_t>;
      launch_kernel(gather_dot_kernel<scalar_t, acc_t>, blocks_for(pairs, kDotWarps), kDotWarps * 32, 0,
                    stream, g.data_ptr<acc_t>(), indices.data_ptr<int64_t>(), pairs, k,
                    table.data_ptr<scalar_t>(), table.size(0), table.size(1), out.data_ptr<acc_t>());
    });
  }

  // predicted_sparse_mlp: the gather GEMV of w_up's rows (gather_dot, a warp per (row,
  // neuron)), bias and activation, then the gather GEMV of w_down_t's rows (gather_rows,
  // split over k for N <= 8). x is already in the accumulation dtype.
  static void gather_mlp(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& w_up,
                         const at::Tensor& b_up, const at::Tensor& w_down_t,
                         const at::Tensor& b_down, Activation act, at::Tensor& pre,
                         at::Tensor& out) {
    const DeviceGuard guard(x.device());
    const int64_t pairs = indices.numel();
    at::Tensor h = at::empty(indices.sizes(), x.options());
    if (pairs > 0 && x.size(1) > 0) gather_dot(x, indices, w_up, h);
    else h.zero_();
    if (pairs > 0) {
      const cudaStream_t stream = current_stream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_up.scalar_type(), "bias_activation_cuda", [&] {
        using acc_t = opmath_t<scalar_t>;
        launch_kernel(bias_activation_kernel<scalar_t, acc_t>, blocks_for(pairs, 256), 256, 0, stream,
                      h.data_ptr<acc_t>(), indices.data_ptr<int64_t>(), pairs, w_up.size(0),
                      b_up.defined() ? b_up.data_ptr<scalar_t>() : nullptr, act == Activation::kGelu,
                      pre.data_ptr<scalar_t>());
      });
    }
    if (out.numel() > 0) gather_rows(h, indices, w_down_t, b_down, out);
  }

  static void scatter_rows(const at::Tensor& v, const at::Tensor& indices, const at::Tensor& g,
                           at::Tensor& out) {
    const DeviceGuard guard(v.device());
    const cudaStream_t stream = current_stream();
    const int64_t pairs = indices.numel(), k = indices.size(1), C = out.size(1);
    const int64_t col_tiles = (C + kColTile - 1) / kColTile;
    const int64_t sms = device_properties().multiProcessorCount;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(pairs * col_tiles, 32 * sms));
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scatter_rows_cuda", [&] {
      launch_kernel(scatter_rows_kernel<scalar_t>, grid, kColTile, 0, stream, v.data_ptr<scalar_t>(),
                    indices.data_ptr<int64_t>(), pairs, k, g.data_ptr<scalar_t>(), out.size(0), C,
                    col_tiles, out.data_ptr<scalar_t>());
    });
  }
};

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) { register_topk_mlp_ops<CudaKernels>(m); }

}  // namespace leanformer
