// RepBN and PRepBN's progressive norm on the CPU. x is read as [N, C] rows: per-channel
// batch statistics are reduced over row blocks in parallel (fp64 partials per thread), and
// one pass then writes gamma * LayerNorm(x) + (1 - gamma) * RepBN(x) per row; RepBN is the
// gamma = 0 case, where the row statistics of LayerNorm are skipped.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "rep_batchnorm_ops.h"

namespace leanformer {
namespace {

constexpr int64_t kRowGrain = 256;

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
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
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

// Batch statistics (training) or the running ones (eval): mean and 1 / sqrt(var + eps).
template <typename scalar_t, typename acc_t>
void bn_statistics(const scalar_t* xp, int64_t N, int64_t C, const bool* maskp, bool training,
                   const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                   acc_t* mp, acc_t* ip) {
  if (!training) {
    const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = rm.data_ptr<acc_t>()[c];
      ip[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv.data_ptr<acc_t>()[c]) + eps));
    }
    return;
  }
  // One pass with sums shifted by the first counted row: var = E[(x - s)^2] - E[x - s]^2
  // keeps its precision in fp64 even when |mean| >> std.
  int64_t first_row = 0;
  while (maskp && first_row + 1 < N && !maskp[first_row]) ++first_row;
  const scalar_t* first = xp + first_row * C;
  const std::vector<acc_t> shift(first, first + C);
  std::vector<double> m[2];
  const int64_t count = reduce_rows<2, acc_t>(N, C, maskp, m, [&](int64_t n, acc_t* out) {
    const scalar_t* row = xp + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
      out[c] += d;
      out[C + c] += d * d;
    }
  });
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

// LayerNorm's row statistics: mean and 1 / sqrt(var + eps) over the C values of a row.
template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* row, int64_t C, double eps, acc_t& mean, acc_t& rstd) {
  mean = row_sum<acc_t>(C, [&](int64_t c) { return static_cast<acc_t>(row[c]); }) / static_cast<acc_t>(C);
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
    // The BN branch, weighted by 1 - gamma: x * scale + shift per channel.
    const double g = args.gamma;
    std::vector<acc_t> scale(C), shift(C), lw(C, acc_t(0)), lb(C, acc_t(0));
    const auto w = args.bn_weight.contiguous(), b = args.bn_bias.contiguous();
    const double a = args.alpha.item<double>();
    for (int64_t c = 0; c < C; ++c) {
      const double wi = static_cast<double>(w.data_ptr<acc_t>()[c]) * ip[c];
      scale[c] = static_cast<acc_t>((1 - g) * (wi + a));
      shift[c] = static_cast<acc_t>((1 - g) * (b.data_ptr<acc_t>()[c] - mp[c] * wi));
    }
    const bool with_ln = g != 0.0;
    if (with_ln) {
      const auto lwt = args.ln_weight->contiguous(), lbt = args.ln_bias->contiguous();
      for (int64_t c = 0; c < C; ++c) {
        lw[c] = static_cast<acc_t>(g * lwt.data_ptr<acc_t>()[c]);
        lb[c] = static_cast<acc_t>(g * lbt.data_ptr<acc_t>()[c]);
      }
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = xp + n * C;
        scalar_t* out = yp + n * C;
        if (!with_ln) {
          for (int64_t c = 0; c < C; ++c)
            out[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) * scale[c] + shift[c]);
          continue;
        }
        acc_t mu, rstd;
        row_statistics(row, C, args.ln_eps, mu, rstd);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(row[c]);
          out[c] = static_cast<scalar_t>((xv - mu) * rstd * lw[c] + lb[c] + xv * scale[c] + shift[c]);
        }
      }
    });
  });
  return {y, mean, invstd};
}

// Gradients of norm_forward: (dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha); the LN ones are
// undefined for RepBN alone.
std::vector<at::Tensor> norm_backward(const at::Tensor& grad_y_in, const NormArgs& args,
                                      const at::Tensor& mean, const at::Tensor& invstd, int64_t N,
                                      int64_t C) {
  const auto x = args.x.contiguous(), grad_y = grad_y_in.contiguous();
  const auto mask = args.mask ? args.mask->contiguous() : at::Tensor();
  const bool with_ln = args.gamma != 0.0;
  const double g = args.gamma;
  auto dx = at::empty(x.sizes(), x.options());
  auto d_bn_w = at::empty({C}, args.bn_weight.options());
  auto d_bn_b = at::empty({C}, args.bn_weight.options());
  auto d_alpha = at::empty(args.alpha.sizes(), args.alpha.options());
  at::Tensor d_ln_w, d_ln_b;
  if (args.ln_weight) {
    d_ln_w = at::zeros({C}, args.bn_weight.options());
    d_ln_b = at::zeros({C}, args.bn_weight.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const auto m = mean.contiguous(), is = invstd.contiguous(), w = args.bn_weight.contiguous();
    const acc_t* mp = m.data_ptr<acc_t>();
    const acc_t* ip = is.data_ptr<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const double a = args.alpha.item<double>();
    std::vector<acc_t> lw(C, acc_t(0));
    if (with_ln) {
      const auto lwt = args.ln_weight->contiguous();
      for (int64_t c = 0; c < C; ++c) lw[c] = lwt.data_ptr<acc_t>()[c];
    }
    // Pass 1, over every row: sum dy, sum dy * xhat_bn, sum dy * x, sum dy * xhat_ln.
    std::vector<double> sums[4];
    reduce_rows<4, acc_t>(N, C, nullptr, sums, [&](int64_t n, acc_t* out) {
      const scalar_t* row = xp + n * C;
      const scalar_t* grow = gp + n * C;
      acc_t mu = 0, rstd = 0;
      if (with_ln) row_statistics(row, C, args.ln_eps, mu, rstd);
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
    double total_dy_x = 0;
    for (int64_t c = 0; c < C; ++c) {
      d_bn_b.data_ptr<acc_t>()[c] = static_cast<acc_t>((1 - g) * sums[0][c]);
      d_bn_w.data_ptr<acc_t>()[c] = static_cast<acc_t>((1 - g) * sums[1][c]);
      if (with_ln) {
        d_ln_b.data_ptr<acc_t>()[c] = static_cast<acc_t>(g * sums[0][c]);
        d_ln_w.data_ptr<acc_t>()[c] = static_cast<acc_t>(g * sums[3][c]);
      }
      total_dy_x += sums[2][c];
    }
    d_alpha.fill_((1 - g) * total_dy_x);
    // BN branch: dx = (1 - gamma) * (dy * k1 + [counted, training] (x * k2 + k3)). Every
    // row's output depends on the statistics of the counted rows, so those rows get
    // -w * invstd * (sum(dy) + xhat * sum(dy * xhat)) / count, sums over all rows.
    const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    int64_t count = N;
    if (maskp) {
      count = 0;
      for (int64_t n = 0; n < N; ++n) count += maskp[n];
    }
    std::vector<acc_t> k1(C), k2(C), k3(C);
    for (int64_t c = 0; c < C; ++c) {
      const double wi = static_cast<double>(wp[c]) * ip[c];
      const double mean_dy = args.training ? sums[0][c] / std::max<int64_t>(count, 1) : 0.0;
      const double mean_dy_xhat = args.training ? sums[1][c] / std::max<int64_t>(count, 1) : 0.0;
      k1[c] = static_cast<acc_t>((1 - g) * (wi + a));
      k2[c] = static_cast<acc_t>((1 - g) * -wi * ip[c] * mean_dy_xhat);
      k3[c] = static_cast<acc_t>((1 - g) * (-wi * mean_dy + wi * mp[c] * ip[c] * mean_dy_xhat));
    }
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = xp + n * C;
        const scalar_t* grow = gp + n * C;
        scalar_t* out = dxp + n * C;
        const bool counted = args.training && (!maskp || maskp[n]);
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
          if (counted) v += xv * k2[c] + k3[c];
          if (with_ln) {
            const acc_t h = static_cast<acc_t>(g) * dy * lw[c];
            v += rstd * (h - mean_h - (xv - mu) * rstd * mean_hx);
          }
          out[c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return {dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  register_norm_ops<&norm_forward, &norm_backward>(m);
}

}  // namespace leanformer
