// The kernels of RepBN and PRepBN's progressive norm, torch-free (pointers and sizes in), and
// their launch geometry (the column split, the row-pass grid); the launchers are in
// rep_batchnorm_cuda.cu. Compiled by nvcc for the GPU and, in the emulation build, for the CPU
// (device.cuh).
#pragma once

#include "device.cuh"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace leanformer {
namespace {

constexpr int kColTile = 32;                           // columns per column-reduction block
constexpr int kRowThreads = 8;                         // warps striding its rows
constexpr int kColThreads = kColTile * kRowThreads;
constexpr int64_t kMinRowsPerBlock = 64;
constexpr int64_t kTargetColBlocks = 1024;             // ~8 resident blocks x 132 SMs (H100/H200)
constexpr int kRowWarps = 8;                           // rows in flight per row-pass block
constexpr int kRowPassThreads = kRowWarps * 32;
constexpr int64_t kMaxRowPassBlocks = int64_t{1} << 16;  // then warps loop over rows
constexpr int kFinalizeThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// VEC consecutive elements, loaded or stored as one 16-byte (or narrower) transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<acc_t>(pk.v[j]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<scalar_t>(in[j]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// Adds the (count, mean, M2) of one set of values into another (Chan et al.): exact in
// exact arithmetic, and unlike E[x^2] - E[x]^2 it does not cancel when |mean| >> std.
template <typename acc_t>
__device__ __forceinline__ void chan_merge(int64_t& n, acc_t& mean, acc_t& m2, int64_t nb,
                                           acc_t mean_b, acc_t m2_b) {
  if (nb == 0) return;
  if (n == 0) {
    n = nb, mean = mean_b, m2 = m2_b;
    return;
  }
  const int64_t total = n + nb;
  const acc_t frac = static_cast<acc_t>(nb) / static_cast<acc_t>(total);
  const acc_t delta = mean_b - mean;
  mean += delta * frac;
  m2 += m2_b + delta * delta * static_cast<acc_t>(n) * frac;
  n = total;
}

// Column c's (count, mean, M2) over every row: the num_parts partials of
// bn_stats_partial_kernel ([num_parts][C] each, counts [num_parts]) merged in order, in fp64.
__device__ __forceinline__ void merge_column_stats(const double* __restrict__ part_mean,
                                                   const double* __restrict__ part_m2,
                                                   const int64_t* __restrict__ part_count,
                                                   int num_parts, int C, int c, int64_t& n,
                                                   double& mean, double& m2) {
  n = 0, mean = 0, m2 = 0;
  for (int p = 0; p < num_parts; ++p)
    chan_merge<double>(n, mean, m2, part_count[p], part_mean[static_cast<int64_t>(p) * C + c],
                       part_m2[static_cast<int64_t>(p) * C + c]);
}

// LayerNorm's row statistics as row_statistics of the CPU file computes them: the mean, summed
// about the row's first value s (mean = s + mean(x - s): a row of equal values gets its exact
// mean, where a plain sum's rounding, amplified by 1 / sqrt(eps), moved LN's output by ~1e-4),
// then the mean squared deviation from it (two passes: no cancellation), rstd in fp64. The
// whole warp calls it for one row (C > 0); every lane gets the result.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_mean_rstd(const scalar_t* __restrict__ row, int C, int lane,
                                              double eps, acc_t& mean, acc_t& rstd) {
  const acc_t s = static_cast<acc_t>(row[0]);
  acc_t sum = 0;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t v[VEC];
    load_pack<VEC>(row + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += v[j] - s;
  }
  mean = s + warp_sum(sum) / static_cast<acc_t>(C);
  acc_t sq = 0;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t v[VEC];
    load_pack<VEC>(row + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t d = v[j] - mean;
      sq += d * d;
    }
  }
  sq = warp_sum(sq);
  rstd = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(sq) / C + eps));
}

// The first row and the row stride of this warp in a row pass (a warp per row).
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t row_stride() {
  return static_cast<int64_t>(gridDim.x) * kRowWarps;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Per-column (count, mean, M2) of the counted rows (mask true, or all) of this block's rows
// [blockIdx.y * rows_per_block, + rows_per_block), into part_*[blockIdx.y][c]. A thread sums
// its rows shifted by the first value it counts (the CPU's shifted sums, with one shift per
// thread: |mean - shift| stays of the order of the std, so s2 - s1^2 / n keeps its precision
// without a division per element); the kRowThreads results of a column then merge by Chan, in
// fp64: a mean rounded to fp32 there (1000 + N(0, 1) loses 3e-5) would move every y by as much.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColThreads)
    bn_stats_partial_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                            int64_t N, int C, int64_t rows_per_block,
                            double* __restrict__ part_mean, double* __restrict__ part_m2,
                            int64_t* __restrict__ part_count) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kColTile + tx;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t end = begin + rows_per_block < N ? begin + rows_per_block : N;
  acc_t shift = 0, s1 = 0, s2 = 0;
  int n = 0;  // also counted past C: every thread of a warp sees the same rows
  for (int64_t r = begin + ty; r < end; r += kRowThreads) {
    if (mask != nullptr && !mask[r]) continue;
    if (c < C) {
      const acc_t v = static_cast<acc_t>(x[r * C + c]);
      if (n == 0) shift = v;
      const acc_t d = v - shift;
      s1 += d;
      s2 += d * d;
    }
    ++n;
  }
  __shared__ int64_t sh_n[kRowThreads][kColTile];
  __shared__ double sh_mean[kRowThreads][kColTile], sh_m2[kRowThreads][kColTile];
  const double inv_n = n > 0 ? 1.0 / n : 0.0;
  const double m2 = static_cast<double>(s2) - static_cast<double>(s1) * s1 * inv_n;
  sh_n[ty][tx] = n;
  sh_mean[ty][tx] = static_cast<double>(shift) + static_cast<double>(s1) * inv_n;
  sh_m2[ty][tx] = m2 < 0.0 ? 0.0 : m2;  // rounding can dip below 0; NaN stays NaN
  __syncthreads();
  if (ty != 0) return;
  int64_t count = sh_n[0][tx];
  double mean = sh_mean[0][tx], M2 = sh_m2[0][tx];
  for (int k = 1; k < kRowThreads; ++k) chan_merge(count, mean, M2, sh_n[k][tx], sh_mean[k][tx], sh_m2[k][tx]);
  if (c < C) {
    part_mean[static_cast<int64_t>(blockIdx.y) * C + c] = mean;
    part_m2[static_cast<int64_t>(blockIdx.y) * C + c] = M2;
  }
  if (blockIdx.x == 0 && tx == 0) part_count[blockIdx.y] = count;
}

// Per column c: BN's statistics, merged from the num_parts partials in order (training) or
// the running ones (eval), written to mean / invstd, and the coefficients of the output pass,
// coef = [scale, shift, ln_w, ln_b, mean, alpha'] x C, as norm_forward of the CPU file computes
// them: y = (x - mu) * rstd * ln_w' + ln_b' + (x - mean) * scale + x * alpha' + shift, with
// gamma folded in. (x - mean) first: x * scale - mean * scale cancels where |mean| >> std.
// A mask that leaves at most one token gives NaN statistics (and y) instead of the CPU's
// error: the count is on the device, and checking it on the host would sync every step.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_forward_finalize_kernel(const double* __restrict__ part_mean,
                                 const double* __restrict__ part_m2,
                                 const int64_t* __restrict__ part_count, int num_parts, int C,
                                 bool training, const acc_t* __restrict__ running_mean,
                                 const acc_t* __restrict__ running_var, double eps,
                                 const acc_t* __restrict__ bn_w, const acc_t* __restrict__ bn_b,
                                 const acc_t* __restrict__ alpha, const acc_t* __restrict__ ln_w,
                                 const acc_t* __restrict__ ln_b, double gamma,
                                 acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out,
                                 acc_t* __restrict__ coef) {
  const int c = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (c >= C) return;
  acc_t m, is;
  if (training) {
    int64_t n;
    double mean, m2;
    merge_column_stats(part_mean, part_m2, part_count, num_parts, C, c, n, mean, m2);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    m = static_cast<acc_t>(n > 1 ? mean : nan);
    is = static_cast<acc_t>(n > 1 ? 1.0 / sqrt(m2 / static_cast<double>(n) + eps) : nan);
  } else {
    m = running_mean[c];
    is = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(running_var[c]) + eps));
  }
  mean_out[c] = m;
  invstd_out[c] = is;
  const double g = gamma;
  coef[c] = static_cast<acc_t>((1 - g) * static_cast<double>(bn_w[c]) * is);
  coef[C + c] = static_cast<acc_t>((1 - g) * static_cast<double>(bn_b[c]));
  coef[2 * C + c] = ln_w != nullptr ? static_cast<acc_t>(g * ln_w[c]) : acc_t(0);
  coef[3 * C + c] = ln_b != nullptr ? static_cast<acc_t>(g * ln_b[c]) : acc_t(0);
  coef[4 * C + c] = m;
  coef[5 * C + c] = static_cast<acc_t>((1 - g) * static_cast<double>(alpha[0]));
}

// rep_batchnorm_stats: per column c the merged (count, mean, M2) unshifted in fp64,
// out = [sum x] x C, [sum x^2] x C, count. Every partial is about its own mean, so only this
// merge of fp64 values sees |mean| >> std. No counted row gives exact zeros.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_sums_finalize_kernel(const double* __restrict__ part_mean, const double* __restrict__ part_m2,
                            const int64_t* __restrict__ part_count, int num_parts, int C,
                            double* __restrict__ out) {
  const int c = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (c >= C) return;
  int64_t n;
  double mean, m2;
  merge_column_stats(part_mean, part_m2, part_count, num_parts, C, c, n, mean, m2);
  const double count = static_cast<double>(n);
  out[c] = count * mean;
  out[C + c] = m2 + count * mean * mean;
  if (c == 0) out[2 * C] = count;
}

// y = gamma * LN(x) + (1 - gamma) * RepBN(x), one warp per row; coef as the finalize wrote it.
template <typename scalar_t, typename acc_t, int VEC, bool WITH_LN>
__global__ void __launch_bounds__(kRowPassThreads)
    norm_output_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ coef, int64_t N,
                       int C, double ln_eps, scalar_t* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const acc_t* scale = coef;
  const acc_t* shift = coef + C;
  const acc_t* lw = coef + 2 * C;
  const acc_t* lb = coef + 3 * C;
  const acc_t* bn_mean = coef + 4 * C;
  const acc_t* a_g = coef + 5 * C;
  for (int64_t n = first_row(); n < N; n += row_stride()) {
    const scalar_t* row = x + n * C;
    acc_t mu = 0, rstd = 0;
    if constexpr (WITH_LN) row_mean_rstd<VEC>(row, C, lane, ln_eps, mu, rstd);
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
      acc_t v[VEC], out[VEC];
      load_pack<VEC>(row + c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t bn = (v[j] - bn_mean[c + j]) * scale[c + j] + v[j] * a_g[c + j] + shift[c + j];
        if constexpr (WITH_LN)
          out[j] = (v[j] - mu) * rstd * lw[c + j] + lb[c + j] + bn;
        else
          out[j] = bn;
      }
      store_pack<VEC>(y + n * C + c, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

// LayerNorm's backward per row: rowstat[n] = {mu, rstd, mean(h), mean(h * xhat)} with
// h = gamma * dy * ln_w, used by the column sums (dy * xhat) and by the dx pass. A null ln_w
// gives the row statistics alone (the h means 0): all the column sums need.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowPassThreads)
    ln_backward_row_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                           const acc_t* __restrict__ ln_w, acc_t gamma, int64_t N, int C,
                           double ln_eps, acc_t* __restrict__ rowstat) {
  const int lane = threadIdx.x % 32;
  for (int64_t n = first_row(); n < N; n += row_stride()) {
    const scalar_t* row = x + n * C;
    const scalar_t* grow = dy + n * C;
    acc_t mu, rstd;
    row_mean_rstd<VEC>(row, C, lane, ln_eps, mu, rstd);
    acc_t sum_h = 0, sum_hx = 0;
    for (int c = lane * VEC; ln_w != nullptr && c < C; c += 32 * VEC) {
      acc_t v[VEC], g[VEC];
      load_pack<VEC>(row + c, v);
      load_pack<VEC>(grow + c, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t h = gamma * g[j] * ln_w[c + j];
        sum_h += h;
        sum_hx += h * (v[j] - mu) * rstd;
      }
    }
    sum_h = warp_sum(sum_h);
    sum_hx = warp_sum(sum_hx);
    if (lane == 0) {
      acc_t* out = rowstat + 4 * n;
      out[0] = mu;
      out[1] = rstd;
      out[2] = sum_h / static_cast<acc_t>(C);
      out[3] = sum_hx / static_cast<acc_t>(C);
    }
  }
}

// Column sums over every row of this block's range (padding rows too: their outputs depend
// on the weights and the statistics as well), into part[blockIdx.y][k][c]:
//   k = 0: dy, 1: dy * xhat_bn, 2: dy * x, 3 (WITH_LN): dy * xhat_ln;
// and, with a mask, the number of counted rows into part_count[blockIdx.y].
template <typename scalar_t, typename acc_t, bool WITH_LN>
__global__ void __launch_bounds__(kColThreads)
    norm_grad_partial_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             const bool* __restrict__ mask, const acc_t* __restrict__ bn_mean,
                             const acc_t* __restrict__ bn_invstd,
                             const acc_t* __restrict__ rowstat, int64_t N, int C,
                             int64_t rows_per_block, acc_t* __restrict__ part,
                             int64_t* __restrict__ part_count) {
  constexpr int K = WITH_LN ? 4 : 3;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kColTile + tx;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t end = begin + rows_per_block < N ? begin + rows_per_block : N;
  const acc_t m = c < C ? bn_mean[c] : acc_t(0);
  const acc_t ip = c < C ? bn_invstd[c] : acc_t(0);
  acc_t s[K];
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = 0;
  int64_t counted = 0;
  for (int64_t r = begin + ty; r < end; r += kRowThreads) {
    if (mask != nullptr) counted += mask[r];
    if (c >= C) continue;
    const acc_t g = static_cast<acc_t>(dy[r * C + c]), xv = static_cast<acc_t>(x[r * C + c]);
    s[0] += g;
    s[1] += g * (xv - m) * ip;
    s[2] += g * xv;
    if constexpr (WITH_LN) s[K - 1] += g * (xv - rowstat[4 * r]) * rowstat[4 * r + 1];
  }
  __shared__ acc_t sh[kRowThreads][K][kColTile];
  __shared__ int64_t sh_counted[kRowThreads];
#pragma unroll
  for (int k = 0; k < K; ++k) sh[ty][k][tx] = s[k];
  if (tx == 0) sh_counted[ty] = counted;
  __syncthreads();
  if (ty != 0) return;
  if (c < C) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t total = sh[0][k][tx];
      for (int t = 1; t < kRowThreads; ++t) total += sh[t][k][tx];
      part[(static_cast<int64_t>(blockIdx.y) * K + k) * C + c] = total;
    }
  }
  if (mask != nullptr && blockIdx.x == 0 && tx == 0) {
    int64_t total = 0;
    for (int t = 0; t < kRowThreads; ++t) total += sh_counted[t];
    part_count[blockIdx.y] = total;
  }
}

// Column c's K sums over every row: the num_parts partials of norm_grad_partial_kernel
// ([num_parts][K][C]) added in order, in fp64.
template <int K, typename acc_t>
__device__ __forceinline__ void sum_column_parts(const acc_t* __restrict__ part, int num_parts,
                                                 int C, int c, double (&s)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) s[k] = 0;
  for (int p = 0; p < num_parts; ++p)
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += part[(static_cast<int64_t>(p) * K + k) * C + c];
}

// Column c's coefficients of the dx pass, coef = [k1, k2, k3, mean] x C, as backward_dx of the
// CPU file: dx_bn = dy * k1 + [counted] ((x - mean) * k2 + k3), gamma folded in; (x - mean)
// first, as x * k2 + mean * k2 cancelled (a 7% error of dx in fp32 with far uncounted rows).
// From the column means of
// dy and dy * xhat_bn over the counted rows (0 in eval). Every row's output depends on the
// statistics of the counted rows, hence sums over all rows divided by the count.
template <typename acc_t>
__device__ __forceinline__ void write_dx_coef(int C, int c, double gamma, double alpha,
                                              const acc_t* __restrict__ bn_w,
                                              const acc_t* __restrict__ bn_mean,
                                              const acc_t* __restrict__ bn_invstd, double mean_dy,
                                              double mean_dy_xhat, acc_t* __restrict__ coef) {
  const double g = gamma;
  const double ip = bn_invstd[c], mp = bn_mean[c];
  const double wi = static_cast<double>(bn_w[c]) * ip;
  coef[c] = static_cast<acc_t>((1 - g) * (wi + alpha));
  coef[C + c] = static_cast<acc_t>((1 - g) * -wi * ip * mean_dy_xhat);
  coef[2 * C + c] = static_cast<acc_t>((1 - g) * -wi * mean_dy);
  coef[3 * C + c] = static_cast<acc_t>(mp);
}

// One block: merges the column sums of the num_parts partials in order, writes the parameter
// gradients, and coef = [k1, k2, k3, mean] x C of the dx pass, as norm_backward of the CPU
// file: dx_bn = dy * k1 + [counted, training] ((x - mean) * k2 + k3).
// One block, because d_alpha = (1 - gamma) * sum over all columns of sum(dy * x). K = 4 sums
// with the LayerNorm branch (as norm_grad_partial_kernel writes them), else 3.
template <typename acc_t, int K>
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_backward_finalize_kernel(const acc_t* __restrict__ part,
                                  const int64_t* __restrict__ part_count, int num_parts, int64_t N, int C, const acc_t* __restrict__ bn_mean,
                                  const acc_t* __restrict__ bn_invstd,
                                  const acc_t* __restrict__ bn_w, const acc_t* __restrict__ alpha,
                                  double gamma, bool training,
                                  acc_t* __restrict__ d_bn_w, acc_t* __restrict__ d_bn_b,
                                  acc_t* __restrict__ d_ln_w, acc_t* __restrict__ d_ln_b,
                                  acc_t* __restrict__ d_alpha, acc_t* __restrict__ coef) {
  int64_t count = N;
  if (part_count != nullptr) {
    count = 0;
    for (int p = 0; p < num_parts; ++p) count += part_count[p];
  }
  const double g = gamma, a = static_cast<double>(alpha[0]);
  const double inv_count = 1.0 / static_cast<double>(count > 1 ? count : 1);
  constexpr bool with_ln = K == 4;
  double dy_x = 0;
  for (int c = threadIdx.x; c < C; c += kFinalizeThreads) {
    double s[K];
    sum_column_parts(part, num_parts, C, c, s);
    d_bn_b[c] = static_cast<acc_t>((1 - g) * s[0]);
    d_bn_w[c] = static_cast<acc_t>((1 - g) * s[1]);
    if (d_ln_w != nullptr) {
      d_ln_b[c] = with_ln ? static_cast<acc_t>(g * s[0]) : acc_t(0);
      d_ln_w[c] = with_ln ? static_cast<acc_t>(g * s[K - 1]) : acc_t(0);
    }
    dy_x += s[2];
    write_dx_coef(C, c, g, a, bn_w, bn_mean, bn_invstd, training ? s[0] * inv_count : 0.0,
                  training ? s[1] * inv_count : 0.0, coef);
  }
  // A fixed tree over the threads' partial sums: deterministic.
  __shared__ double sh[kFinalizeThreads];
  sh[threadIdx.x] = dy_x;
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) sh[threadIdx.x] += sh[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) d_alpha[0] = static_cast<acc_t>((1 - g) * sh[0]);
}

// progressive_norm_backward_reduce: column c's sums over every row in fp64, out [4, C] as
// norm_grad_partial_kernel orders them; the dy * xhat_ln row is 0 without LayerNorm (K = 3).
template <typename acc_t, int K>
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_grad_sums_finalize_kernel(const acc_t* __restrict__ part, int num_parts, int C,
                                   double* __restrict__ out) {
  const int c = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (c >= C) return;
  double s[K];
  sum_column_parts(part, num_parts, C, c, s);
#pragma unroll
  for (int k = 0; k < K; ++k) out[k * C + c] = s[k];
  if constexpr (K == 3) out[3 * C + c] = 0;
}

// progressive_norm_backward_elemt: coef of the dx pass from the column means of the whole
// (distributed) batch, mean_dy and mean_dy_xhat fp64 [C].
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_dx_coef_kernel(const acc_t* __restrict__ bn_w, const acc_t* __restrict__ bn_mean,
                        const acc_t* __restrict__ bn_invstd, const acc_t* __restrict__ alpha,
                        const double* __restrict__ mean_dy,
                        const double* __restrict__ mean_dy_xhat, double gamma, int C,
                        acc_t* __restrict__ coef) {
  const int c = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (c >= C) return;
  write_dx_coef(C, c, gamma, static_cast<double>(alpha[0]), bn_w, bn_mean, bn_invstd, mean_dy[c],
                mean_dy_xhat[c], coef);
}

// dx, one warp per row: the BN branch with coef = [k1, k2, k3, mean] and, WITH_LN, LayerNorm's
// row-local backward rstd * (h - mean(h) - xhat * mean(h * xhat)) from rowstat.
template <typename scalar_t, typename acc_t, int VEC, bool WITH_LN>
__global__ void __launch_bounds__(kRowPassThreads)
    norm_dx_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                   const bool* __restrict__ mask, bool training, const acc_t* __restrict__ coef,
                   const acc_t* __restrict__ ln_w, acc_t gamma, const acc_t* __restrict__ rowstat,
                   int64_t N, int C, scalar_t* __restrict__ dx) {
  const int lane = threadIdx.x % 32;
  const acc_t* k1 = coef;
  const acc_t* k2 = coef + C;
  const acc_t* k3 = coef + 2 * C;
  const acc_t* bn_mean = coef + 3 * C;
  for (int64_t n = first_row(); n < N; n += row_stride()) {
    const bool counted = training && (mask == nullptr || mask[n]);
    acc_t mu = 0, rstd = 0, mean_h = 0, mean_hx = 0;
    if constexpr (WITH_LN) {
      mu = rowstat[4 * n], rstd = rowstat[4 * n + 1];
      mean_h = rowstat[4 * n + 2], mean_hx = rowstat[4 * n + 3];
    }
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
      acc_t v[VEC], g[VEC], out[VEC];
      load_pack<VEC>(x + n * C + c, v);
      load_pack<VEC>(dy + n * C + c, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t o = g[j] * k1[c + j];
        if (counted) o += (v[j] - bn_mean[c + j]) * k2[c + j] + k3[c + j];
        if constexpr (WITH_LN) {
          const acc_t h = gamma * g[j] * ln_w[c + j];
          o += rstd * (h - mean_h - (v[j] - mu) * rstd * mean_hx);
        }
        out[j] = o;
      }
      store_pack<VEC>(dx + n * C + c, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The row split of the column reductions: at least kMinRowsPerBlock rows a block (a multiple
// of kRowThreads) and about kTargetColBlocks blocks in all; a function of (N, C) alone.
// parts = 0 (nothing to launch) when x is empty.
struct ColumnSplit {
  dim3 grid;
  int64_t rows_per_block = 0;
  int parts = 0;  // row blocks
};

ColumnSplit column_split(int64_t N, int C) {
  if (N == 0 || C == 0) return {};
  const int64_t col_tiles = (C + kColTile - 1) / kColTile;
  const int64_t max_parts = std::max<int64_t>(1, kTargetColBlocks / col_tiles);
  const int64_t parts = std::min((N + kMinRowsPerBlock - 1) / kMinRowsPerBlock, max_parts);
  int64_t rows = (N + parts - 1) / parts;
  rows = (rows + kRowThreads - 1) / kRowThreads * kRowThreads;
  const int64_t used = (N + rows - 1) / rows;
  return {dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(used)), rows,
          static_cast<int>(used)};
}

unsigned row_pass_blocks(int64_t N) {
  return static_cast<unsigned>(std::min((N + kRowWarps - 1) / kRowWarps, kMaxRowPassBlocks));
}

unsigned finalize_blocks(int C) {
  return static_cast<unsigned>((C + kFinalizeThreads - 1) / kFinalizeThreads);
}

// 16-byte accesses need C to be a multiple of the pack and every row pointer 16-byte aligned.
template <typename scalar_t>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  if (C % kVec != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace
}  // namespace leanformer
