// RepBN on the CPU: x is read as [N, C] rows; per-channel statistics are reduced over row
// blocks in parallel (fp64 partial sums per thread, two passes: mean, then centered squares),
// and the normalization is one fused per-channel scale and shift.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "rep_batchnorm_checks.h"

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> rep_batchnorm_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& alpha, const at::Tensor& running_mean, const at::Tensor& running_var,
    bool training, double eps, const std::optional<at::Tensor>& mask_in) {
  const RepBNShape s = check_rep_batchnorm_inputs(x_in, weight, bias, alpha, running_mean,
                                                  running_var, mask_in);
  const auto x = x_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  const auto param_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty(x.sizes(), x.options());
  auto mean = at::empty({s.C}, x.options().dtype(param_dtype));
  auto invstd = at::empty({s.C}, x.options().dtype(param_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rep_batchnorm_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const int64_t C = s.C;
    if (training) {
      const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      // One pass with sums shifted by the first row: var = E[(x - s)^2] - E[x - s]^2 keeps
      // its precision in fp64 even when |mean| >> std.
      int64_t first_row = 0;
      while (maskp && first_row + 1 < s.N && !maskp[first_row]) ++first_row;
      const scalar_t* first = xp + first_row * C;
      std::vector<double> m[2];
      const std::vector<acc_t> shift(first, first + C);
      const int64_t count = reduce_rows<2, acc_t>(s.N, C, maskp, m, [&](int64_t n, acc_t* out) {
        const scalar_t* row = xp + n * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
          out[c] += d;
          out[C + c] += d * d;
        }
      });
      TORCH_CHECK(count > 1, "rep_batchnorm: training needs more than one ",
                  maskp ? "unmasked " : "", "token per channel to estimate statistics, got ", count);
      std::vector<double> sums(C), sq(C);
      for (int64_t c = 0; c < C; ++c) {
        const double shifted_mean = m[0][c] / static_cast<double>(count);
        sums[c] = shifted_mean + static_cast<double>(first[c]);
        sq[c] = std::max(0.0, m[1][c] / static_cast<double>(count) - shifted_mean * shifted_mean) *
                static_cast<double>(count);
      }
      for (int64_t c = 0; c < C; ++c) {
        mp[c] = static_cast<acc_t>(sums[c]);
        ip[c] = static_cast<acc_t>(1.0 / std::sqrt(sq[c] / static_cast<double>(count) + eps));
      }
    } else {
      const auto rm = running_mean.contiguous(), rv = running_var.contiguous();
      for (int64_t c = 0; c < C; ++c) {
        mp[c] = rm.data_ptr<acc_t>()[c];
        ip[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv.data_ptr<acc_t>()[c]) + eps));
      }
    }
    // y = x * (w * invstd + alpha) + (b - mean * invstd * w)
    std::vector<acc_t> scale(C), shift(C);
    const auto w = weight.contiguous(), b = bias.contiguous();
    const acc_t a = alpha.item<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      const acc_t wi = w.data_ptr<acc_t>()[c] * ip[c];
      scale[c] = wi + a;
      shift[c] = b.data_ptr<acc_t>()[c] - mp[c] * wi;
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, s.N, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t c = 0; c < C; ++c)
          yp[n * C + c] = static_cast<scalar_t>(static_cast<acc_t>(xp[n * C + c]) * scale[c] + shift[c]);
    });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rep_batchnorm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& alpha, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    const std::optional<at::Tensor>& mask_in) {
  const RepBNShape s = check_rep_batchnorm_backward_inputs(grad_y_in, x_in, weight, alpha, mean,
                                                           invstd, mask_in);
  const auto x = x_in.contiguous(), grad_y = grad_y_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto dx = at::empty(x.sizes(), x.options());
  auto dweight = at::empty({s.C}, weight.options());
  auto dbias = at::empty({s.C}, weight.options());
  auto dalpha = at::empty(alpha.sizes(), alpha.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rep_batchnorm_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t C = s.C;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const auto m = mean.contiguous(), is = invstd.contiguous(), w = weight.contiguous();
    const acc_t* mp = m.data_ptr<acc_t>();
    const acc_t* ip = is.data_ptr<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const acc_t a = alpha.item<acc_t>();
    // Over every row: the parameters' gradients.
    std::vector<double> sums[3];
    reduce_rows<3, acc_t>(s.N, C, nullptr, sums, [&](int64_t n, acc_t* out) {
      const scalar_t* row = xp + n * C;
      const scalar_t* grow = gp + n * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dy = static_cast<acc_t>(grow[c]), xv = static_cast<acc_t>(row[c]);
        out[c] += dy;
        out[C + c] += dy * (xv - mp[c]) * ip[c];
        out[2 * C + c] += dy * xv;
      }
    });
    const std::vector<double>&sum_dy = sums[0], &sum_dy_xhat = sums[1], &sum_dy_x = sums[2];
    double total_dy_x = 0;
    for (int64_t c = 0; c < C; ++c) {
      dbias.data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_dy[c]);
      dweight.data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_dy_xhat[c]);
      total_dy_x += sum_dy_x[c];
    }
    dalpha.fill_(total_dy_x);
    // Training: every row's output depends on the statistics of the unmasked rows, so those
    // rows get -w * invstd * (sum(dy) + xhat * sum(dy * xhat)) / count, sums over all rows.
    std::vector<double> corr_dy(C, 0.0), corr_dy_xhat(C, 0.0);
    const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    if (training) {
      int64_t count = s.N;
      if (maskp) {
        count = 0;
        for (int64_t n = 0; n < s.N; ++n) count += maskp[n];
      }
      for (int64_t c = 0; c < C; ++c) {
        corr_dy[c] = sum_dy[c] / static_cast<double>(std::max<int64_t>(count, 1));
        corr_dy_xhat[c] = sum_dy_xhat[c] / static_cast<double>(std::max<int64_t>(count, 1));
      }
    }
    // dx = dy * k1 + [unmasked, training] (x * k2 + k3), per-channel coefficients.
    std::vector<acc_t> k1(C), k2(C), k3(C);
    for (int64_t c = 0; c < C; ++c) {
      const double wi = static_cast<double>(wp[c]) * ip[c];
      k1[c] = static_cast<acc_t>(wi + a);
      k2[c] = static_cast<acc_t>(-wi * ip[c] * corr_dy_xhat[c]);
      k3[c] = static_cast<acc_t>(-wi * corr_dy[c] + wi * mp[c] * ip[c] * corr_dy_xhat[c]);
    }
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, s.N, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* row = xp + n * C;
        const scalar_t* grow = gp + n * C;
        scalar_t* out = dxp + n * C;
        if (training && (!maskp || maskp[n])) {
          for (int64_t c = 0; c < C; ++c)
            out[c] = static_cast<scalar_t>(static_cast<acc_t>(grow[c]) * k1[c] +
                                           static_cast<acc_t>(row[c]) * k2[c] + k3[c]);
        } else {
          for (int64_t c = 0; c < C; ++c)
            out[c] = static_cast<scalar_t>(static_cast<acc_t>(grow[c]) * k1[c]);
        }
      }
    });
  });
  return {dx, dweight, dbias, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("rep_batchnorm", &rep_batchnorm_cpu);
  m.impl("rep_batchnorm_backward", &rep_batchnorm_backward_cpu);
}

}  // namespace leanformer
