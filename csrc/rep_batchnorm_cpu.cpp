// RepBN and PRepBN's progressive norm on the CPU. x is read as [N, C] rows: per-channel
// batch statistics are reduced over row blocks in parallel (fp64 partials per thread), and
// one pass then writes gamma * LayerNorm(x) + (1 - gamma) * RepBN(x) per row; RepBN is the
// gamma = 0 case, where the row statistics of LayerNorm are skipped.
// For data parallelism the same passes are exposed apart (rep_batchnorm_stats, and the
// backward's column sums and grad_x pass), so that the statistics can be all-reduced between.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "grain.h"
#include "rep_batchnorm_ops.h"
#include "small_gemm.h"  // LEANFORMER_CLONES

namespace leanformer {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// sums[k][c] = sum over rows n (where mask[n], if given) of the k-th value f writes for
// (n, c): K sums in one pass. Rows accumulate in acc_t for kFlushRows rows (so the inner loop
// vectorizes), then flush into fp64 partials. Returns the row count.
constexpr int64_t kFlushRows = 64;

template <int K, typename acc_t, typename F>
int64_t reduce_rows(int64_t N, int64_t C, const bool* mask, std::vector<double> (&sums)[K],
                    const F& f) {
  const int threads = at::get_num_threads();
  std::vector<std::vector<double>> partial(threads, std::vector<double>(K * C, 0.0));
  std::vector<int64_t> counts(threads, 0);
  // K sums of a converted element per element of the row
  const int64_t grain = parallel_grain(work_ns(double(K) * C, double(C) * sizeof(acc_t)));
  parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    double* acc = partial[at::get_thread_num()].data();
    int64_t& count = counts[at::get_thread_num()];
    std::vector<acc_t> block(K * C);
    for (int64_t n0 = begin; n0 < end; n0 += kFlushRows) {
      std::fill(block.begin(), block.end(), acc_t(0));
      for (int64_t n = n0; n < std::min(end, n0 + kFlushRows); ++n) {
        if (mask && !mask[n]) continue;
        ++count;
        f(n, block.data());
      }
      for (int64_t i = 0; i < K * C; ++i) acc[i] += block[i];
    }
  });
  int64_t total = 0;
  for (int k = 0; k < K; ++k) sums[k].assign(C, 0.0);
  for (int t = 0; t < threads; ++t) {
    total += counts[t];
    for (int k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) sums[k][c] += partial[t][k * C + c];
  }
  return total;
}

// Per-channel sums over the counted rows, shifted by the first counted row s (the last row
// when none is): sums[0] = sum (x - s), sums[1] = sum (x - s)^2. A sum of squares about a
// value near the mean keeps its precision in the fp32 blocks of reduce_rows even when
// |mean| >> std. Returns the count.
template <typename scalar_t, typename acc_t>
int64_t shifted_sums(const scalar_t* xp, int64_t N, int64_t C, const bool* maskp,
                     std::vector<acc_t>& shift, std::vector<double> (&sums)[2]) {
  int64_t first_row = 0;
  while (maskp && first_row + 1 < N && !maskp[first_row]) ++first_row;
  shift.assign(C, acc_t(0));
  if (N > 0) std::copy(xp + first_row * C, xp + first_row * C + C, shift.begin());
  return reduce_rows<2, acc_t>(N, C, maskp, sums, [&](int64_t n, acc_t* out) {
    const scalar_t* row = xp + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
      out[c] += d;
      out[C + c] += d * d;
    }
  });
}

// alpha's one value without item()'s dispatch (checked float32, or float64 for float64 x).
inline double alpha_value(const at::Tensor& alpha) {
  return alpha.scalar_type() == at::kDouble ? *alpha.const_data_ptr<double>()
                                            : static_cast<double>(*alpha.const_data_ptr<float>());
}

// Batch statistics (training) or the running ones (eval): mean and 1 / sqrt(var + eps).
template <typename scalar_t, typename acc_t>
void bn_statistics(const scalar_t* xp, int64_t N, int64_t C, const bool* maskp, bool training,
                   const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                   acc_t* mp, acc_t* ip) {
  if (!training) {
    // Pointers hoisted: data_ptr<T>() type-checks on every call, which at decoding's one token
    // per call cost more than the normalization itself.
    const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
    const acc_t* rmp = rm.data_ptr<acc_t>();
    const acc_t* rvp = rv.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = rmp[c];
      ip[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rvp[c]) + eps));
    }
    return;
  }
  // var = E[(x - s)^2] - E[x - s]^2, in fp64.
  std::vector<acc_t> shift;
  std::vector<double> m[2];
  const int64_t count = shifted_sums(xp, N, C, maskp, shift, m);
  TORCH_CHECK(count > 1, "batch norm: training needs more than one ", maskp ? "unmasked " : "",
              "token per channel to estimate statistics, got ", count);
  for (int64_t c = 0; c < C; ++c) {
    const double shifted_mean = m[0][c] / static_cast<double>(count);
    const double var = std::max(0.0, m[1][c] / static_cast<double>(count) - shifted_mean * shifted_mean);
    mp[c] = static_cast<acc_t>(shifted_mean + static_cast<double>(shift[c]));
    ip[c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
  }
}

// sum over c < C of f(c) with 8 independent partial sums: a single running sum is a chain
// of dependent adds the compiler may not reorder (no -ffast-math), 4x slower here.
template <typename acc_t, typename F>
inline acc_t row_sum(int64_t C, const F& f) {
  acc_t part[8] = {};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) part[j] += f(c + j);
  acc_t total = 0;
  for (; c < C; ++c) total += f(c);
  for (int j = 0; j < 8; ++j) total += part[j];
  return total;
}

// fp32 row kernels of the backward as plain functions, so the loader can pick their AVX2+FMA
// clone (the templates and the lambdas around them stay baseline x86-64): 1.6x on the backward
// at [12608, 384]. Partial sums run 8 wide, as row_sum's do.
// The mean is summed about the row's first value s (mean = s + mean(x - s)), as the batch
// statistics are: a row of equal values gets its exact mean and x - mean = 0, where a plain sum's
// rounding, amplified by 1 / sqrt(eps), made LayerNorm's output off by ~1e-4 in fp32.
LEANFORMER_CLONES void row_statistics_f32(const float* __restrict row, int64_t C, double eps, float& mean, float& rstd) {
  const float s = C > 0 ? row[0] : 0.f;
  float p[8] = {}, q[8] = {};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) p[j] += row[c + j] - s;
  float total = 0;
  for (; c < C; ++c) total += row[c] - s;
  for (int j = 0; j < 8; ++j) total += p[j];
  mean = s + total / static_cast<float>(C);
  c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) {
      const float d = row[c + j] - mean;
      q[j] += d * d;
    }
  float sq = 0;
  for (; c < C; ++c) sq += (row[c] - mean) * (row[c] - mean);
  for (int j = 0; j < 8; ++j) sq += q[j];
  rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sq) / C + eps));
}

// out [4, C] += dy, dy * xhat_bn, dy * x and (with_ln) dy * xhat_ln of one row.
LEANFORMER_CLONES void backward_sums_row_f32(const float* __restrict row, const float* __restrict grow, const float* mp,
                                             const float* ip, int64_t C, bool with_ln, float mu,
                                             float rstd, float* __restrict out) {
  for (int64_t c = 0; c < C; ++c) {
    const float dy = grow[c], xv = row[c];
    out[c] += dy;
    out[C + c] += dy * (xv - mp[c]) * ip[c];
    out[2 * C + c] += dy * xv;
  }
  if (with_ln)
    for (int64_t c = 0; c < C; ++c) out[3 * C + c] += grow[c] * (row[c] - mu) * rstd;
}

// One row of dx: dy * k1 (+ x * k2 + k3 when counted) (+ the LN branch when with_ln).
LEANFORMER_CLONES void backward_dx_row_f32(const float* __restrict row, const float* __restrict grow, const float* k1,
                                           const float* k2, const float* k3, const float* bn_mean, const float* lw,
                                           int64_t C, bool counted, bool with_ln, float g,
                                           double ln_eps, float* __restrict out) {
  float mu = 0, rstd = 0, mean_h = 0, mean_hx = 0;
  if (with_ln) {
    row_statistics_f32(row, C, ln_eps, mu, rstd);
    float p[8] = {}, q[8] = {};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      for (int j = 0; j < 8; ++j) {
        const float h = g * grow[c + j] * lw[c + j];
        p[j] += h;
        q[j] += h * (row[c + j] - mu) * rstd;
      }
    for (; c < C; ++c) {
      const float h = g * grow[c] * lw[c];
      mean_h += h;
      mean_hx += h * (row[c] - mu) * rstd;
    }
    for (int j = 0; j < 8; ++j) mean_h += p[j], mean_hx += q[j];
    mean_h /= static_cast<float>(C);
    mean_hx /= static_cast<float>(C);
  }
  if (counted && with_ln) {
    for (int64_t c = 0; c < C; ++c) {
      const float dy = grow[c], xv = row[c], h = g * dy * lw[c];
      out[c] = dy * k1[c] + (xv - bn_mean[c]) * k2[c] + k3[c] + rstd * (h - mean_h - (xv - mu) * rstd * mean_hx);
    }
  } else if (counted) {
    for (int64_t c = 0; c < C; ++c) out[c] = grow[c] * k1[c] + (row[c] - bn_mean[c]) * k2[c] + k3[c];
  } else if (with_ln) {
    for (int64_t c = 0; c < C; ++c) {
      const float dy = grow[c], xv = row[c], h = g * dy * lw[c];
      out[c] = dy * k1[c] + rstd * (h - mean_h - (xv - mu) * rstd * mean_hx);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = grow[c] * k1[c];
  }
}

// The fp32 rows take the cloned kernels above; other dtypes return false and run the template.
inline bool fast_backward_sums_row(const float* row, const float* grow, const float* mp, const float* ip,
                                   int64_t C, bool with_ln, double ln_eps, float* out) {
  float mu = 0, rstd = 0;
  if (with_ln) row_statistics_f32(row, C, ln_eps, mu, rstd);
  backward_sums_row_f32(row, grow, mp, ip, C, with_ln, mu, rstd, out);
  return true;
}
template <typename scalar_t, typename acc_t>
inline bool fast_backward_sums_row(const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, int64_t,
                                   bool, double, acc_t*) {
  return false;
}
inline bool fast_backward_dx_row(const float* row, const float* grow, const float* k1, const float* k2,
                                 const float* k3, const float* bn_mean, const float* lw, int64_t C, bool counted,
                                 bool with_ln, double g, double ln_eps, float* out) {
  backward_dx_row_f32(row, grow, k1, k2, k3, bn_mean, lw, C, counted, with_ln, static_cast<float>(g), ln_eps, out);
  return true;
}
template <typename scalar_t, typename acc_t>
inline bool fast_backward_dx_row(const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, const acc_t*,
                                 const acc_t*, const acc_t*, int64_t, bool, bool, double, double, scalar_t*) {
  return false;
}

// LayerNorm's row statistics: mean and 1 / sqrt(var + eps) over the C values of a row.
template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* row, int64_t C, double eps, acc_t& mean, acc_t& rstd) {
  const acc_t s = C > 0 ? static_cast<acc_t>(row[0]) : acc_t(0);  // about the first value, as row_statistics_f32
  mean = s + row_sum<acc_t>(C, [&](int64_t c) { return static_cast<acc_t>(row[c]) - s; }) / static_cast<acc_t>(C);
  const acc_t m = mean;
  const acc_t sq = row_sum<acc_t>(C, [&](int64_t c) {
    const acc_t d = static_cast<acc_t>(row[c]) - m;
    return d * d;
  });
  rstd = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(sq) / C + eps));
}

// y = gamma * (LN(x) * ln_w + ln_b) + (1 - gamma) * (BN(x) * bn_w + bn_b + alpha * x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const NormArgs& args, int64_t N, int64_t C) {
  const auto x = args.x.contiguous();
  const auto mask = args.mask ? args.mask->contiguous() : at::Tensor();
  const auto param_dtype = rep_batchnorm_param_dtype(x);
  auto y = at::empty(x.sizes(), x.options());
  auto mean = at::empty({C}, x.options().dtype(param_dtype));
  auto invstd = at::empty({C}, x.options().dtype(param_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    bn_statistics(xp, N, C, mask.defined() ? mask.data_ptr<bool>() : nullptr, args.training,
                  args.running_mean, args.running_var, args.bn_eps, mp, ip);
    // The BN branch, weighted by 1 - gamma: (x - mean) * scale + x * alpha + shift per channel.
    // (x - mean) first: x * scale - mean * scale cancels, losing digits where |mean| >> std.
    const double g = args.gamma;
    std::vector<acc_t> scale(C), shift(C), lw(C, acc_t(0)), lb(C, acc_t(0));
    const auto w = args.bn_weight.contiguous(), b = args.bn_bias.contiguous();
    const double a = alpha_value(args.alpha);
    const acc_t a_g = static_cast<acc_t>((1 - g) * a);
    const acc_t* wp = w.data_ptr<acc_t>();
    const acc_t* bp = b.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = static_cast<acc_t>((1 - g) * static_cast<double>(wp[c]) * ip[c]);
      shift[c] = static_cast<acc_t>((1 - g) * bp[c]);
    }
    const bool with_ln = g != 0.0;
    if (with_ln) {
      const auto lwt = args.ln_weight->contiguous(), lbt = args.ln_bias->contiguous();
      const acc_t* lwp = lwt.data_ptr<acc_t>();
      const acc_t* lbp = lbt.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        lw[c] = static_cast<acc_t>(g * lwp[c]);
        lb[c] = static_cast<acc_t>(g * lbp[c]);
      }
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    // a few multiply-adds per element (twice that with the LayerNorm), a row read and written
    const double row_ns = work_ns((with_ln ? 8.0 : 4.0) * C, 2.0 * C * sizeof(scalar_t));
    parallel_for(0, N, parallel_grain(row_ns), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = xp + n * C;
        scalar_t* out = yp + n * C;
        if (!with_ln) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xv = static_cast<acc_t>(row[c]);
            out[c] = static_cast<scalar_t>((xv - mp[c]) * scale[c] + xv * a_g + shift[c]);
          }
          continue;
        }
        acc_t mu, rstd;
        row_statistics(row, C, args.ln_eps, mu, rstd);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(row[c]);
          out[c] = static_cast<scalar_t>((xv - mu) * rstd * lw[c] + lb[c] + (xv - mp[c]) * scale[c] + xv * a_g +
                                         shift[c]);
        }
      }
    });
  });
  return {y, mean, invstd};
}

// Pass 1 of the backward, over every row (masked or not): the fp64 column sums [4, C] of dy,
// dy * xhat_bn, dy * x and, when gamma != 0, dy * xhat_ln (zeros otherwise). The parameter
// gradients are these sums scaled; the BN part of dx needs the first two over the whole batch.
at::Tensor backward_sums(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& invstd, double gamma, double ln_eps, int64_t N, int64_t C) {
  auto out = at::zeros({4, C}, x.options().dtype(at::kDouble));
  const bool with_ln = gamma != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_sums_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const auto m = mean.contiguous(), is = invstd.contiguous();
    const acc_t* mp = m.data_ptr<acc_t>();
    const acc_t* ip = is.data_ptr<acc_t>();
    std::vector<double> sums[4];
    reduce_rows<4, acc_t>(N, C, nullptr, sums, [&](int64_t n, acc_t* out) {
      const scalar_t* row = xp + n * C;
      const scalar_t* grow = gp + n * C;
      acc_t mu = 0, rstd = 0;
      if (fast_backward_sums_row(row, grow, mp, ip, C, with_ln, ln_eps, out)) return;
      if (with_ln) row_statistics(row, C, ln_eps, mu, rstd);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dy = static_cast<acc_t>(grow[c]), xv = static_cast<acc_t>(row[c]);
        out[c] += dy;
        out[C + c] += dy * (xv - mp[c]) * ip[c];
        out[2 * C + c] += dy * xv;
      }
      if (with_ln)
        for (int64_t c = 0; c < C; ++c)
          out[3 * C + c] += static_cast<acc_t>(grow[c]) * (static_cast<acc_t>(row[c]) - mu) * rstd;
    });
    double* op = out.data_ptr<double>();
    for (int k = 0; k < 4; ++k) std::copy(sums[k].begin(), sums[k].end(), op + k * C);
  });
  return out;
}

// Pass 2: dx = dy * k1 + [counted] ((x - mean) * k2 + k3) + the row-local LN branch, the k's
// holding 1 - gamma.
// Every row's output depends on the statistics of the counted rows, so those rows (mask true,
// all when it is undefined; none when mean_dy is null, as in eval) get
// -w * invstd * (mean_dy + xhat * mean_dy_xhat), the column sums of dy and dy * xhat over every
// row divided by the count of counted rows.
// x and grad_y are contiguous (args.x is not read).
at::Tensor backward_dx(const at::Tensor& grad_y, const at::Tensor& x, const NormArgs& args,
                       const at::Tensor& mean, const at::Tensor& invstd, const double* mean_dy,
                       const double* mean_dy_xhat, int64_t N, int64_t C) {
  const auto mask = args.mask ? args.mask->contiguous() : at::Tensor();
  const bool with_ln = args.gamma != 0.0;
  const double g = args.gamma;
  auto dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_dx_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const auto m = mean.contiguous(), is = invstd.contiguous(), w = args.bn_weight.contiguous();
    const acc_t* mp = m.data_ptr<acc_t>();
    const acc_t* ip = is.data_ptr<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const double a = alpha_value(args.alpha);
    std::vector<acc_t> lw(C, acc_t(0));
    if (with_ln) {
      const auto lwt = args.ln_weight->contiguous();
      const acc_t* lwp = lwt.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) lw[c] = lwp[c];
    }
    const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    std::vector<acc_t> k1(C), k2(C), k3(C);
    for (int64_t c = 0; c < C; ++c) {
      const double wi = static_cast<double>(wp[c]) * ip[c];
      const double mdy = mean_dy ? mean_dy[c] : 0.0, mdyx = mean_dy ? mean_dy_xhat[c] : 0.0;
      k1[c] = static_cast<acc_t>((1 - g) * (wi + a));
      // the counted rows' statistics term is (x - mean) * k2 + k3: x * k2 and a k3 holding
      // mean * k2 cancelled, losing every digit where invstd^2 * mean_dy_xhat is large (a
      // channel with nearly equal counted values, and uncounted rows far from them)
      k2[c] = static_cast<acc_t>((1 - g) * -wi * ip[c] * mdyx);
      k3[c] = static_cast<acc_t>((1 - g) * -wi * mdy);
    }
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    // the forward's work again on x and dy, with the LayerNorm's two reductions
    const double row_ns = work_ns(16.0 * C, 3.0 * C * sizeof(scalar_t));
    parallel_for(0, N, parallel_grain(row_ns), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = xp + n * C;
        const scalar_t* grow = gp + n * C;
        scalar_t* out = dxp + n * C;
        const bool counted = mean_dy && (!maskp || maskp[n]);
        if (fast_backward_dx_row(row, grow, k1.data(), k2.data(), k3.data(), mp, lw.data(), C, counted,
                                 with_ln, g, args.ln_eps, out))
          continue;
        // LN branch, row-local: rstd * (h - mean(h) - xhat * mean(h * xhat)), h = gamma dy ln_w.
        acc_t mu = 0, rstd = 0, mean_h = 0, mean_hx = 0;
        if (with_ln) {
          row_statistics(row, C, args.ln_eps, mu, rstd);
          const acc_t gg = static_cast<acc_t>(g);
          mean_h = row_sum<acc_t>(C, [&](int64_t c) { return gg * static_cast<acc_t>(grow[c]) * lw[c]; }) /
                   static_cast<acc_t>(C);
          mean_hx = row_sum<acc_t>(C, [&](int64_t c) {
                      return gg * static_cast<acc_t>(grow[c]) * lw[c] * (static_cast<acc_t>(row[c]) - mu) * rstd;
                    }) / static_cast<acc_t>(C);
        }
        for (int64_t c = 0; c < C; ++c) {
          const acc_t dy = static_cast<acc_t>(grow[c]), xv = static_cast<acc_t>(row[c]);
          acc_t v = dy * k1[c];
          if (counted) v += (xv - mp[c]) * k2[c] + k3[c];
          if (with_ln) {
            const acc_t h = static_cast<acc_t>(g) * dy * lw[c];
            v += rstd * (h - mean_h - (xv - mu) * rstd * mean_hx);
          }
          out[c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return dx;
}

// Gradients of norm_forward: (dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha); the LN ones are
// undefined for RepBN alone.
std::vector<at::Tensor> norm_backward(const at::Tensor& grad_y_in, const NormArgs& args,
                                      const at::Tensor& mean, const at::Tensor& invstd, int64_t N,
                                      int64_t C) {
  const auto x = args.x.contiguous(), grad_y = grad_y_in.contiguous();
  const double g = args.gamma;
  const auto sums = backward_sums(grad_y, x, mean, invstd, g, args.ln_eps, N, C);
  const double* sp = sums.data_ptr<double>();
  const auto popts = args.bn_weight.options();
  auto d_bn_w = at::empty({C}, popts), d_bn_b = at::empty({C}, popts);
  auto d_alpha = at::empty(args.alpha.sizes(), args.alpha.options());
  at::Tensor d_ln_w, d_ln_b;
  if (args.ln_weight) {
    d_ln_w = at::empty({C}, popts);
    d_ln_b = at::empty({C}, popts);
  }
  AT_DISPATCH_FLOATING_TYPES(d_bn_w.scalar_type(), "norm_backward_params_cpu", [&] {
    double total_dy_x = 0;
    scalar_t* dbb = d_bn_b.data_ptr<scalar_t>();
    scalar_t* dbw = d_bn_w.data_ptr<scalar_t>();
    scalar_t* dlb = args.ln_weight ? d_ln_b.data_ptr<scalar_t>() : nullptr;
    scalar_t* dlw = args.ln_weight ? d_ln_w.data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      dbb[c] = static_cast<scalar_t>((1 - g) * sp[c]);
      dbw[c] = static_cast<scalar_t>((1 - g) * sp[C + c]);
      if (dlw) {
        dlb[c] = static_cast<scalar_t>(g * sp[c]);
        dlw[c] = static_cast<scalar_t>(g * sp[3 * C + c]);
      }
      total_dy_x += sp[2 * C + c];
    }
    d_alpha.fill_((1 - g) * total_dy_x);
  });
  // The statistics term: column means over the counted rows (training only).
  std::vector<double> mean_dy(C), mean_dy_xhat(C);
  if (args.training) {
    int64_t count = N;
    if (args.mask) {
      const auto mask = args.mask->contiguous();
      const bool* maskp = mask.data_ptr<bool>();
      count = std::count(maskp, maskp + N, true);
    }
    for (int64_t c = 0; c < C; ++c) {
      mean_dy[c] = sp[c] / std::max<int64_t>(count, 1);
      mean_dy_xhat[c] = sp[C + c] / std::max<int64_t>(count, 1);
    }
  }
  auto dx = backward_dx(grad_y, x, args, mean, invstd, args.training ? mean_dy.data() : nullptr,
                        mean_dy_xhat.data(), N, C);
  return {dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha};
}

// The local statistics of a data-parallel shard, fp64 [2C + 1]: sum x and sum x^2 over the
// counted rows per channel, then the count, ready to be all-reduced in one collective.
at::Tensor rep_batchnorm_stats_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in) {
  const RepBNShape s = check_norm_input(x_in, mask_in);
  const auto x = x_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  const int64_t C = s.C;
  auto out = at::empty({2 * C + 1}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rep_batchnorm_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> shift;
    std::vector<double> m[2];
    const int64_t count = shifted_sums(x.data_ptr<scalar_t>(), s.N, C,
                                       mask.defined() ? mask.data_ptr<bool>() : nullptr, shift, m);
    // Unshift in fp64: sum x = S1 + n s, sum x^2 = S2 + 2 s S1 + n s^2.
    double* op = out.data_ptr<double>();
    const double n = static_cast<double>(count);
    for (int64_t c = 0; c < C; ++c) {
      const double sh = shift[c];
      op[c] = m[0][c] + n * sh;
      op[C + c] = m[1][c] + 2 * sh * m[0][c] + n * sh * sh;
    }
    op[2 * C] = n;
  });
  return out;
}

at::Tensor progressive_norm_backward_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                double gamma, double ln_eps) {
  const RepBNShape s = check_norm_backward_reduce_inputs(grad_y, x, mean, invstd, gamma);
  return backward_sums(grad_y.contiguous(), x.contiguous(), mean, invstd, gamma, ln_eps, s.N, s.C);
}

at::Tensor progressive_norm_backward_elemt_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& ln_weight,
    const at::Tensor& bn_weight, const at::Tensor& alpha, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat,
    double gamma, double ln_eps, const std::optional<at::Tensor>& mask) {
  const RepBNShape s = check_norm_backward_elemt_inputs(grad_y, x, ln_weight, bn_weight, alpha, mean,
                                                        invstd, mean_dy, mean_dy_xhat, gamma, mask);
  const at::Tensor none;
  const auto xc = x.contiguous(), mdy = mean_dy.contiguous(), mdyx = mean_dy_xhat.contiguous();
  const NormArgs args{xc, ln_weight ? &*ln_weight : nullptr, nullptr, bn_weight, none, alpha, none,
                      none, gamma, true, ln_eps, 0.0, mask};
  return backward_dx(grad_y.contiguous(), xc, args, mean, invstd, mdy.data_ptr<double>(),
                     mdyx.data_ptr<double>(), s.N, s.C);
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  register_norm_ops<&norm_forward, &norm_backward>(m);
  m.impl("rep_batchnorm_stats", &rep_batchnorm_stats_cpu);
  m.impl("progressive_norm_backward_reduce", &progressive_norm_backward_reduce_cpu);
  m.impl("progressive_norm_backward_elemt", &progressive_norm_backward_elemt_cpu);
}

}  // namespace leanformer
