// CUDA kernels of RepBN and PRepBN's progressive norm: the ops, semantics and structure of
// rep_batchnorm_cpu.cpp. One core writes gamma * LayerNorm(x) + (1 - gamma) * RepBN(x);
// RepBN is the gamma = 0 case, which skips LayerNorm's row statistics. The ops of
// synchronized (data-parallel) statistics run the same kernels, their passes apart.
//
// x is read as [N, C] rows, C contiguous, in two access patterns:
//   * Column reductions (BN's batch statistics; the backward's column sums): a block owns
//     kColTile columns, one per lane, so a warp reads 32 neighbouring values of one row
//     (coalesced), and a range of rows that its kRowThreads warps stride through. Each block
//     writes one partial per column and a finalize kernel merges a column's partials in
//     row-block order. No atomics, so reruns are bitwise identical; the split depends on
//     (N, C) alone, so the result does not change with the GPU's SM count either.
//   * Row passes (the output, dx, LayerNorm's row statistics): one warp per row, lanes strided
//     over the columns with 16-byte vector loads when C and the pointers allow it. A row is
//     read again after its statistics; at these sizes (C ~ 384) the second read hits L1.
// Accumulation is in acc_t (fp32; fp64 for fp64 x). The per-column finalize work (a few
// flops per column) is in fp64, as on the CPU.
#include "../rep_batchnorm_ops.h"
#include "launch.h"
#include "rep_batchnorm_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace leanformer {
namespace {

// Calls f(std::bool_constant<WITH_LN>{}): the kernel variant with or without LayerNorm.
template <typename F>
void with_ln_variant(bool with_ln, const F& f) {
  if (with_ln)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// Calls f(std::integral_constant<int, VEC>{}, std::bool_constant<WITH_LN>{}) for the row
// pass variant: the 16-byte pack or one element, with or without the LayerNorm branch.
template <typename scalar_t, typename F>
void with_row_variant(bool vectorize, bool with_ln, const F& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto ln = [&](auto vec) { with_ln_variant(with_ln, [&](auto l) { f(vec, l); }); };
  if (vectorize)
    ln(std::integral_constant<int, kVec>{});
  else
    ln(std::integral_constant<int, 1>{});
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

int checked_columns(int64_t C) {
  TORCH_CHECK(C <= INT_MAX, "x.shape[-1] = ", C, " is over the CUDA kernels' limit of ", INT_MAX);
  return static_cast<int>(C);
}

void check_sizes(int64_t N, int64_t C, bool training, bool masked) {
  checked_columns(C);
  // The count of a mask is on the device: kernels turn a count <= 1 into NaN statistics.
  TORCH_CHECK(!training || N > 1, "batch norm: training needs more than one ",
              masked ? "unmasked " : "", "token per channel to estimate statistics, got ", N,
              masked ? " tokens in all" : "");
}

// The per-row-block statistics of the counted rows: part_stats [2, split.parts, C] (mean, M2
// per row block and column) and part_count [split.parts].
template <typename scalar_t>
void launch_bn_stats_partials(const scalar_t* x, const bool* mask, int64_t N, int C,
                              const ColumnSplit& split, double* part_stats, int64_t* part_count,
                              cudaStream_t stream) {
  if (split.parts == 0) return;
  launch_kernel(bn_stats_partial_kernel<scalar_t, opmath_t<scalar_t>>, split.grid, dim3(kColTile, kRowThreads), 0,
                stream, x, mask, N, C, split.rows_per_block, part_stats,
                part_stats + static_cast<int64_t>(split.parts) * C, part_count);
}

// The kernel launches of a backward over x and dy [N, C] (contiguous) on one stream; rowstat
// [N, 4] holds LayerNorm's per-row backward statistics when with_ln.
template <typename scalar_t, typename acc_t>
struct BackwardPasses {
  const scalar_t* x;
  const scalar_t* dy;
  const bool* mask;  // the counted rows; null: all
  int64_t N;
  int C;
  bool with_ln;
  bool vectorize;  // the row passes' 16-byte accesses (x, dy and dx aligned)
  acc_t* rowstat;
  cudaStream_t stream;

  // Over x and dy [N, C] (contiguous) on the current stream; dx, when defined, the output the
  // row passes write (in the alignment check of their 16-byte accesses).
  static BackwardPasses make(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mask,
                             const at::Tensor& dx, int64_t N, int C, bool with_ln,
                             const at::Tensor& rowstat) {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const void* out = dx.defined() ? dx.data_ptr() : nullptr;
    return {xp, gp, ptr_or_null<bool>(mask), N, C, with_ln,
            can_vectorize<scalar_t>(C, {xp, gp, out}), rowstat.data_ptr<acc_t>(),
            current_stream()};
  }

  // rowstat (with_ln); ln_w null: the row statistics alone, for the column sums.
  void ln_rows(const acc_t* ln_w, acc_t gamma, double ln_eps) const {
    if (!with_ln || N == 0 || C == 0) return;
    with_row_variant<scalar_t>(vectorize, false, [&](auto vec, auto) {
      launch_kernel(ln_backward_row_kernel<scalar_t, acc_t, decltype(vec)::value>, row_pass_blocks(N),
                    kRowPassThreads, 0, stream, x, dy, ln_w, gamma, N, C, ln_eps, rowstat);
    });
  }

  // The column sums per row block, part [split.parts, with_ln ? 4 : 3, C], and with a mask the
  // counted rows per row block, part_count [split.parts]. After ln_rows.
  void column_sums(const ColumnSplit& split, const acc_t* bn_mean, const acc_t* bn_invstd,
                   acc_t* part, int64_t* part_count) const {
    if (split.parts == 0) return;
    with_ln_variant(with_ln, [&](auto ln) {
      launch_kernel(norm_grad_partial_kernel<scalar_t, acc_t, decltype(ln)::value>, split.grid,
                    dim3(kColTile, kRowThreads), 0, stream, x, dy, mask, bn_mean, bn_invstd, rowstat, N, C,
                    split.rows_per_block, part, mask != nullptr ? part_count : nullptr);
    });
  }

  // dx with coef = [k1, k2, k3, mean] x C; counted rows get the statistics term when training.
  // After ln_rows with ln_w.
  void dx(bool training, const acc_t* coef, const acc_t* ln_w, acc_t gamma, scalar_t* out) const {
    if (N == 0 || C == 0) return;
    with_row_variant<scalar_t>(vectorize, with_ln, [&](auto vec, auto ln) {
      launch_kernel(norm_dx_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(ln)::value>,
                    row_pass_blocks(N), kRowPassThreads, 0, stream, x, dy, mask, training, coef, ln_w,
                    gamma, rowstat, N, C, out);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const NormArgs& args, int64_t N,
                                                            int64_t C64) {
  check_sizes(N, C64, args.training, args.mask.has_value());
  const DeviceGuard device_guard(args.x.device());
  const int C = static_cast<int>(C64);
  const auto x = args.x.contiguous();
  const auto mask = args.mask ? args.mask->contiguous() : at::Tensor();
  const auto param_dtype = rep_batchnorm_param_dtype(x);
  const auto popts = x.options().dtype(param_dtype);
  auto y = at::empty(x.sizes(), x.options());
  auto mean = at::empty({C}, popts);
  auto invstd = at::empty({C}, popts);
  const bool with_ln = args.gamma != 0.0;
  const auto w = args.bn_weight.contiguous(), b = args.bn_bias.contiguous();
  const auto alpha = args.alpha.contiguous();
  const at::Tensor lw = args.ln_weight ? args.ln_weight->contiguous() : at::Tensor();
  const at::Tensor lb = args.ln_bias ? args.ln_bias->contiguous() : at::Tensor();
  const at::Tensor rm = args.training ? at::Tensor() : args.running_mean.contiguous();
  const at::Tensor rv = args.training ? at::Tensor() : args.running_var.contiguous();
  if (C == 0) return {y, mean, invstd};
  const ColumnSplit split = args.training ? column_split(N, C) : ColumnSplit{};
  const int parts = split.parts;
  auto part_stats = at::empty({2, parts, C}, x.options().dtype(at::kDouble));
  auto part_count = at::empty({parts}, x.options().dtype(at::kLong));
  auto coef = at::empty({6, C}, popts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_forward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* part_mean = part_stats.data_ptr<double>();
    launch_bn_stats_partials(xp, ptr_or_null<bool>(mask), N, C, split, part_mean,
                             part_count.data_ptr<int64_t>(), stream);
    launch_kernel(norm_forward_finalize_kernel<acc_t>, finalize_blocks(C), kFinalizeThreads, 0, stream,
                  part_mean, part_mean + static_cast<int64_t>(parts) * C, part_count.data_ptr<int64_t>(),
                  parts, C, args.training, ptr_or_null<acc_t>(rm), ptr_or_null<acc_t>(rv), args.bn_eps,
                  w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), alpha.data_ptr<acc_t>(),
                  with_ln ? lw.data_ptr<acc_t>() : nullptr, with_ln ? lb.data_ptr<acc_t>() : nullptr,
                  args.gamma, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    if (N == 0) return;
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_row_variant<scalar_t>(can_vectorize<scalar_t>(C, {xp, yp}), with_ln, [&](auto vec, auto ln) {
      launch_kernel(norm_output_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(ln)::value>,
                    row_pass_blocks(N), kRowPassThreads, 0, stream, xp, coef.data_ptr<acc_t>(), N, C,
                    args.ln_eps, yp);
    });
  });
  return {y, mean, invstd};
}

// Gradients of norm_forward: (dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha); the LN ones are
// undefined for RepBN alone.
std::vector<at::Tensor> norm_backward(const at::Tensor& grad_y_in, const NormArgs& args,
                                      const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                      int64_t N, int64_t C64) {
  const int C = checked_columns(C64);
  const DeviceGuard device_guard(args.x.device());
  const auto x = args.x.contiguous(), grad_y = grad_y_in.contiguous();
  const auto mask = args.mask ? args.mask->contiguous() : at::Tensor();
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const auto w = args.bn_weight.contiguous(), alpha = args.alpha.contiguous();
  const bool with_ln = args.gamma != 0.0;
  const at::Tensor lw = with_ln ? args.ln_weight->contiguous() : at::Tensor();
  const auto popts = args.bn_weight.options();
  auto dx = at::empty(x.sizes(), x.options());
  auto d_bn_w = at::empty({C}, popts);
  auto d_bn_b = at::empty({C}, popts);
  auto d_alpha = at::empty(args.alpha.sizes(), args.alpha.options());
  at::Tensor d_ln_w, d_ln_b;
  if (args.ln_weight) {
    d_ln_w = at::empty({C}, popts);
    d_ln_b = at::empty({C}, popts);
  }
  const int K = with_ln ? 4 : 3;
  const ColumnSplit split = column_split(N, C);
  const int parts = split.parts;
  auto part = at::empty({parts, K, C}, popts);
  auto part_count = at::empty({mask.defined() ? parts : 0}, x.options().dtype(at::kLong));
  auto coef = at::empty({4, C}, popts);
  auto rowstat = at::empty({with_ln ? N : 0, 4}, popts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* lwp = ptr_or_null<acc_t>(lw);
    const acc_t g = static_cast<acc_t>(args.gamma);
    const auto pass =
        BackwardPasses<scalar_t, acc_t>::make(x, grad_y, mask, dx, N, C, with_ln, rowstat);
    pass.ln_rows(lwp, g, args.ln_eps);
    pass.column_sums(split, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                     part.data_ptr<acc_t>(), part_count.data_ptr<int64_t>());
    with_ln_variant(with_ln, [&](auto ln) {
      constexpr int K = decltype(ln)::value ? 4 : 3;
      launch_kernel(norm_backward_finalize_kernel<acc_t, K>, 1, kFinalizeThreads, 0, stream,
                    part.data_ptr<acc_t>(), mask.defined() ? part_count.data_ptr<int64_t>() : nullptr,
                    parts, N, C, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
                    alpha.data_ptr<acc_t>(), args.gamma, args.training, d_bn_w.data_ptr<acc_t>(),
                    d_bn_b.data_ptr<acc_t>(), d_ln_w.defined() ? d_ln_w.data_ptr<acc_t>() : nullptr,
                    d_ln_b.defined() ? d_ln_b.data_ptr<acc_t>() : nullptr, d_alpha.data_ptr<acc_t>(),
                    coef.data_ptr<acc_t>());
    });
    pass.dx(args.training, coef.data_ptr<acc_t>(), lwp, g, dx.data_ptr<scalar_t>());
  });
  return {dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha};
}

// ---------------------------------------------------------------------------------------------
// The ops of synchronized (data-parallel) statistics, as rep_batchnorm_cpu.cpp defines them:
// the passes of the two cores above apart, so that a collective can run between them.

// fp64 [2C + 1]: sum x and sum x^2 over the counted rows per channel, then the count.
at::Tensor rep_batchnorm_stats_cuda(const at::Tensor& x_in,
                                    const std::optional<at::Tensor>& mask_in) {
  const RepBNShape s = check_norm_input(x_in, mask_in);
  const int C = checked_columns(s.C);
  const DeviceGuard device_guard(x_in.device());
  if (C == 0) return at::zeros({1}, x_in.options().dtype(at::kDouble));
  const auto x = x_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto out = at::empty({2 * static_cast<int64_t>(C) + 1}, x.options().dtype(at::kDouble));
  const ColumnSplit split = column_split(s.N, C);
  const auto popts = x.options().dtype(rep_batchnorm_param_dtype(x));
  auto part_stats = at::empty({2, split.parts, C}, x.options().dtype(at::kDouble));
  auto part_count = at::empty({split.parts}, x.options().dtype(at::kLong));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rep_batchnorm_stats_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    double* part_mean = part_stats.data_ptr<double>();
    launch_bn_stats_partials(x.data_ptr<scalar_t>(), ptr_or_null<bool>(mask), s.N, C, split,
                             part_mean, part_count.data_ptr<int64_t>(), stream);
    launch_kernel(bn_sums_finalize_kernel<acc_t>, finalize_blocks(C), kFinalizeThreads, 0, stream,
                  part_mean, part_mean + static_cast<int64_t>(split.parts) * C,
                  part_count.data_ptr<int64_t>(), split.parts, C, out.data_ptr<double>());
  });
  return out;
}

// fp64 [4, C]: the column sums over every row of dy, dy * xhat_bn, dy * x and (gamma != 0)
// dy * xhat_ln, zeros otherwise.
at::Tensor progressive_norm_backward_reduce_cuda(const at::Tensor& grad_y_in,
                                                 const at::Tensor& x_in, const at::Tensor& mean_in,
                                                 const at::Tensor& invstd_in, double gamma,
                                                 double ln_eps) {
  const RepBNShape s =
      check_norm_backward_reduce_inputs(grad_y_in, x_in, mean_in, invstd_in, gamma);
  const int C = checked_columns(s.C);
  const int64_t N = s.N;
  const DeviceGuard device_guard(x_in.device());
  const auto x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  auto out = at::empty({4, C}, x.options().dtype(at::kDouble));
  if (C == 0) return out;
  const bool with_ln = gamma != 0.0;
  const auto popts = mean.options();
  const ColumnSplit split = column_split(N, C);
  auto part = at::empty({split.parts, with_ln ? 4 : 3, C}, popts);
  auto rowstat = at::empty({with_ln ? N : 0, 4}, popts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_reduce_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const at::Tensor none;  // every row counts: no mask; no dx
    const auto pass =
        BackwardPasses<scalar_t, acc_t>::make(x, grad_y, none, none, N, C, with_ln, rowstat);
    pass.ln_rows(nullptr, acc_t(0), ln_eps);
    pass.column_sums(split, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                     part.data_ptr<acc_t>(), nullptr);
    with_ln_variant(with_ln, [&](auto ln) {
      constexpr int K = decltype(ln)::value ? 4 : 3;
      launch_kernel(norm_grad_sums_finalize_kernel<acc_t, K>, finalize_blocks(C), kFinalizeThreads, 0,
                    stream, part.data_ptr<acc_t>(), split.parts, C, out.data_ptr<double>());
    });
  });
  return out;
}

// dx with the column means of the whole batch (mean_dy, mean_dy_xhat fp64 [C]); the rows
// where mask is true (all without one) get the statistics term.
at::Tensor progressive_norm_backward_elemt_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha_in, const at::Tensor& mean_in,
    const at::Tensor& invstd_in, const at::Tensor& mean_dy_in, const at::Tensor& mean_dy_xhat_in,
    double gamma, double ln_eps, const std::optional<at::Tensor>& mask_in) {
  const RepBNShape s = check_norm_backward_elemt_inputs(grad_y_in, x_in, ln_weight, bn_weight,
                                                        alpha_in, mean_in, invstd_in, mean_dy_in,
                                                        mean_dy_xhat_in, gamma, mask_in);
  const int C = checked_columns(s.C);
  const int64_t N = s.N;
  const DeviceGuard device_guard(x_in.device());
  const auto x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  auto dx = at::empty(x.sizes(), x.options());
  if (N == 0 || C == 0) return dx;
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  const auto mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const auto w = bn_weight.contiguous(), alpha = alpha_in.contiguous();
  const auto mdy = mean_dy_in.contiguous(), mdyx = mean_dy_xhat_in.contiguous();
  const bool with_ln = gamma != 0.0;
  const at::Tensor lw = with_ln ? ln_weight->contiguous() : at::Tensor();
  const auto popts = w.options();
  auto coef = at::empty({4, C}, popts);
  auto rowstat = at::empty({with_ln ? N : 0, 4}, popts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_elemt_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* lwp = ptr_or_null<acc_t>(lw);
    const acc_t g = static_cast<acc_t>(gamma);
    const auto pass =
        BackwardPasses<scalar_t, acc_t>::make(x, grad_y, mask, dx, N, C, with_ln, rowstat);
    pass.ln_rows(lwp, g, ln_eps);
    launch_kernel(norm_dx_coef_kernel<acc_t>, finalize_blocks(C), kFinalizeThreads, 0, stream,
                  w.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                  alpha.data_ptr<acc_t>(), mdy.data_ptr<double>(), mdyx.data_ptr<double>(), gamma, C,
                  coef.data_ptr<acc_t>());
    pass.dx(true, coef.data_ptr<acc_t>(), lwp, g, dx.data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace

LEANFORMER_CUDA_LIBRARY_IMPL(m) {
  register_norm_ops<&norm_forward, &norm_backward>(m);
  m.impl("rep_batchnorm_stats", &rep_batchnorm_stats_cuda);
  m.impl("progressive_norm_backward_reduce", &progressive_norm_backward_reduce_cuda);
  m.impl("progressive_norm_backward_elemt", &progressive_norm_backward_elemt_cuda);
}

}  // namespace leanformer
