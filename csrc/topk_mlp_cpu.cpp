// Top-k sparse MLP kernels on the CPU (the ops themselves are in topk_mlp_ops.h).
//
// select: one row per step of at::parallel_for. Each element becomes one integer rank (the
// order key of its activation value above its inverted index), so ranks are distinct and
// std::nth_element on them is a deterministic partial selection, ties going to the lowest
// index. A threshold from a histogram of the top key bits first drops everything that cannot
// be in the top k, so nth_element only sorts out the few candidates in the boundary bin.
// gather_rows / gather_dot / scatter_rows: the selected rows of the table are read as
// contiguous slices of 256-bit vectors (AVX2 clone where available, see small_gemm.h).
// gather_mlp (predicted_sparse_mlp) chains the two: gathered dots with w_up's rows, then
// a gathered accumulation of w_down_t's rows, split over the k neurons for a few rows.
// gather_rows tiles (row block x column block): with few rows the columns are split over
// the threads, with many rows a task's rows share its column slice of the table in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_vec.h"
#include "grain.h"
#include "small_gemm.h"
#include "topk_mlp_checks.h"
#include "topk_mlp_ops.h"

namespace leanformer {
namespace {

// kRelu or kIdentity (see select_activated). NaN passes through ReLU, as in F.relu.
template <typename acc_t>
inline acc_t activate(acc_t x, Activation act) {
  return act == Activation::kRelu && x < acc_t(0) ? acc_t(0) : x;
}

// ---- selection ----

// A rank: larger is better. fp32 keys and the inverted index pack into one uint64_t;
// fp64 keys need a pair.
inline uint64_t make_rank(float v, uint32_t i) { return (uint64_t(order_key(v)) << 32) | ~i; }
inline std::pair<uint64_t, uint32_t> make_rank(double v, uint32_t i) { return {order_key(v), ~i}; }
inline uint32_t rank_index(uint64_t r) { return ~static_cast<uint32_t>(r); }
inline uint32_t rank_index(const std::pair<uint64_t, uint32_t>& r) { return ~r.second; }
inline uint32_t rank_top_bits(uint64_t r) { return static_cast<uint32_t>(r >> 52); }
inline uint32_t rank_top_bits(const std::pair<uint64_t, uint32_t>& r) {
  return static_cast<uint32_t>(r.first >> 52);
}

constexpr int kHistBits = 12;
constexpr int64_t kHistMinLen = 1024;  // below this, plain nth_element is as fast

// Moves the k largest ranks of r[0, n) to r[0, k) (in any order); 0 < k < n.
template <typename rank_t>
void select_largest(rank_t* r, int64_t n, int64_t k, std::vector<uint32_t>& hist) {
  if (n >= kHistMinLen) {
    // The bin of the k-th largest rank by the top 12 key bits: everything above it is in,
    // everything below out; only that bin's members need ordering.
    hist.assign(size_t(1) << kHistBits, 0);
    for (int64_t i = 0; i < n; ++i) ++hist[rank_top_bits(r[i])];
    int64_t above = 0;
    uint32_t bin = (1u << kHistBits) - 1;
    while (above + hist[bin] < k) above += hist[bin--];
    int64_t in = 0;  // the sure ones to [0, above), then the boundary bin's members
    for (int64_t i = 0; i < n; ++i)
      if (rank_top_bits(r[i]) > bin) std::swap(r[in++], r[i]);
    int64_t cand = in;
    for (int64_t i = in; i < n; ++i)
      if (rank_top_bits(r[i]) == bin) std::swap(r[cand++], r[i]);
    std::nth_element(r + above, r + k, r + cand, std::greater<>());
    return;
  }
  std::nth_element(r, r + k, r + n, std::greater<>());
}

template <typename scalar_t>
void select_rows(const at::Tensor& h, int64_t k, Activation act, at::Tensor& values,
                 at::Tensor& indices, at::Tensor& pre) {
  using acc_t = acc_type<scalar_t>;
  using rank_t = decltype(make_rank(acc_t(0), 0u));
  const int64_t N = h.size(0), d_ff = h.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* vp = values.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  scalar_t* pp = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
  // a rank, a histogram count and a compare per element
  parallel_for(0, N, parallel_grain(work_ns(0, 0, 3.0 * d_ff)), [&](int64_t begin, int64_t end) {
    std::vector<rank_t> ranks(k < d_ff ? d_ff : 0);
    std::vector<uint32_t> hist;
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = hp + n * d_ff;
      int64_t* idx = ip + n * k;
      if (k < d_ff) {
        // Ranked as the values will be returned: rounded to scalar_t.
        for (int64_t i = 0; i < d_ff; ++i)
          ranks[i] = make_rank(static_cast<acc_t>(static_cast<scalar_t>(
                                   activate(static_cast<acc_t>(row[i]), act))),
                               static_cast<uint32_t>(i));
        select_largest(ranks.data(), d_ff, k, hist);
        for (int64_t j = 0; j < k; ++j) idx[j] = rank_index(ranks[j]);
        std::sort(idx, idx + k);
      } else {
        for (int64_t j = 0; j < k; ++j) idx[j] = j;
      }
      for (int64_t j = 0; j < k; ++j) {
        vp[n * k + j] = static_cast<scalar_t>(activate(static_cast<acc_t>(row[idx[j]]), act));
        if (pp) pp[n * k + j] = row[idx[j]];
      }
    }
  });
}

// acc[0, n) += sum_{j < R} v[j] * table[idx[j] * ld + (0, n)]: R rows per pass over acc.
template <int R, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void axpy_rows(const acc_t* v, const int64_t* idx,
                                                     const scalar_t* table, int64_t ld,
                                                     acc_t* acc, int64_t n) {
  using V = vec_t<acc_t>;
  constexpr int W = VecOf<acc_t>::width;
  const scalar_t* r[R];
  V a[R];
  for (int i = 0; i < R; ++i) {
    r[i] = table + idx[i] * ld;
    a[i] = v[i] - V{};  // a broadcast (x - 0 == x exactly)
  }
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    V s;
    std::memcpy(&s, acc + c, sizeof(V));
    for (int i = 0; i < R; ++i) s += a[i] * vload(r[i] + c);
    std::memcpy(acc + c, &s, sizeof(V));
  }
  for (; c < n; ++c)
    for (int i = 0; i < R; ++i) acc[c] += v[i] * acc_t(r[i][c]);
}

// acc[0, n) += sum_j v[j] * table[idx[j] * ld + (0, n)]
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void gather_axpy_impl(int64_t k, const acc_t* v,
                                                            const int64_t* idx,
                                                            const scalar_t* table, int64_t ld,
                                                            acc_t* acc, int64_t n) {
  constexpr int R = 4;
  int64_t j = 0;
  for (; j + R <= k; j += R) {
    if (j + 2 * R <= k)  // the next group's rows: random addresses the prefetcher cannot guess
      for (int p = R; p < 2 * R; ++p) __builtin_prefetch(table + idx[j + p] * ld);
    axpy_rows<R>(v + j, idx + j, table, ld, acc, n);
  }
  for (; j < k; ++j) axpy_rows<1>(v + j, idx + j, table, ld, acc, n);
}

// out[r * ldo] = x[r * ldx + (0, n)] . w[0, n) for r < R: one pass over w for R rows of x
// (two accumulator sets while they fit in the 16 registers, to hide the FMA latency).
template <int R, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void dot_rows(const acc_t* x, int64_t ldx,
                                                    const scalar_t* w, int64_t n, acc_t* out,
                                                    int64_t ldo) {
  using V = vec_t<acc_t>;
  constexpr int W = VecOf<acc_t>::width, U = R <= 4 ? 2 : 1;
  V s[U][R] = {};
  int64_t c = 0;
  for (; c + U * W <= n; c += U * W)
    for (int u = 0; u < U; ++u) {
      const V wv = vload(w + c + u * W);
      for (int r = 0; r < R; ++r) s[u][r] += vload(x + r * ldx + c + u * W) * wv;
    }
  for (; c + W <= n; c += W) {
    const V wv = vload(w + c);
    for (int r = 0; r < R; ++r) s[0][r] += vload(x + r * ldx + c) * wv;
  }
  for (int r = 0; r < R; ++r) {
    V t = s[0][r];
    if (U == 2) t += s[U - 1][r];
    acc_t total = 0;
    for (int i = 0; i < W; ++i) total += t[i];
    for (int64_t cc = c; cc < n; ++cc) total += x[r * ldx + cc] * acc_t(w[cc]);
    out[r * ldo] = total;
  }
}

// out[j] = g[0, n) . table[idx[j] * ld + (0, n)]
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void gather_dot_impl(int64_t k, const acc_t* g,
                                                           const int64_t* idx,
                                                           const scalar_t* table, int64_t ld,
                                                           acc_t* out, int64_t n) {
  for (int64_t j = 0; j < k; ++j) dot_rows<1>(g, 0, table + idx[j] * ld, n, out + j, 0);
}

// out[r, i] = x[r] . table[i] for rows i in [i0, i1) of the table and R <= kMaxDenseRows
// rows of x: a GEMV that reads the table once for all of them.
constexpr int64_t kMaxDenseRows = 8;

template <int R, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void dense_dot_rows(const acc_t* x, int64_t i0, int64_t i1,
                                                          const scalar_t* table, int64_t n,
                                                          acc_t* out, int64_t ldo) {
  for (int64_t i = i0; i < i1; ++i) {
    if (i + 4 < i1) __builtin_prefetch(table + (i + 4) * n);
    dot_rows<R>(x, n, table + i * n, n, out + i, ldo);
  }
}

template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void dense_dot_impl(int64_t R, const acc_t* x, int64_t i0,
                                                          int64_t i1, const scalar_t* table,
                                                          int64_t n, acc_t* out, int64_t ldo) {
  switch (R) {
    case 1: dense_dot_rows<1>(x, i0, i1, table, n, out, ldo); break;
    case 2: dense_dot_rows<2>(x, i0, i1, table, n, out, ldo); break;
    case 3: dense_dot_rows<3>(x, i0, i1, table, n, out, ldo); break;
    case 4: dense_dot_rows<4>(x, i0, i1, table, n, out, ldo); break;
    case 5: dense_dot_rows<5>(x, i0, i1, table, n, out, ldo); break;
    case 6: dense_dot_rows<6>(x, i0, i1, table, n, out, ldo); break;
    case 7: dense_dot_rows<7>(x, i0, i1, table, n, out, ldo); break;
    case 8: dense_dot_rows<8>(x, i0, i1, table, n, out, ldo); break;
    default: TORCH_CHECK(false, "dense_dot: at most ", kMaxDenseRows, " rows, got ", R);
  }
}

// dst[0, n) += a * src[0, n)
template <typename acc_t>
__attribute__((always_inline)) inline void axpy_impl(acc_t a, const acc_t* src, acc_t* dst,
                                                     int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += a * src[c];
}

#define LEANFORMER_TOPK_KERNELS(acc_t, scalar_t)                                              \
  LEANFORMER_CLONES void gather_axpy(int64_t k, const acc_t* v, const int64_t* idx,          \
                                     const scalar_t* table, int64_t ld, acc_t* acc,          \
                                     int64_t n) {                                            \
    gather_axpy_impl(k, v, idx, table, ld, acc, n);                                          \
  }                                                                                          \
  LEANFORMER_CLONES void gather_dot(int64_t k, const acc_t* g, const int64_t* idx,           \
                                    const scalar_t* table, int64_t ld, acc_t* out,           \
                                    int64_t n) {                                             \
    gather_dot_impl(k, g, idx, table, ld, out, n);                                           \
  }
LEANFORMER_TOPK_KERNELS(float, float)
LEANFORMER_TOPK_KERNELS(float, c10::BFloat16)
LEANFORMER_TOPK_KERNELS(float, c10::Half)
LEANFORMER_TOPK_KERNELS(double, double)
#undef LEANFORMER_TOPK_KERNELS

LEANFORMER_CLONES void dense_dot(int64_t R, const float* x, int64_t i0, int64_t i1,
                                 const float* table, int64_t n, float* out, int64_t ldo) {
  dense_dot_impl(R, x, i0, i1, table, n, out, ldo);
}

LEANFORMER_CLONES void axpy(float a, const float* src, float* dst, int64_t n) {
  axpy_impl(a, src, dst, n);
}
LEANFORMER_CLONES void axpy(double a, const double* src, double* dst, int64_t n) {
  axpy_impl(a, src, dst, n);
}

void check_row_indices(const int64_t* idx, int64_t k, int64_t d_ff) {
  for (int64_t j = 0; j < k; ++j) check_index(idx[j], d_ff);
}

// Column blocks of at least 64 values (whole cache lines of every gathered row), enough of
// them that `tasks_wanted` tasks exist.
int64_t column_block(int64_t C, int64_t tasks_wanted) {
  const int64_t cw = round_up((C + tasks_wanted - 1) / std::max<int64_t>(tasks_wanted, 1), 16);
  return std::min(C, std::max<int64_t>(cw, 64));
}

struct CpuKernels {
  // x [N, d_model] @ w_up^T + b_up. For a few fp32 rows libtorch's GEMM runs one GEMV per
  // row and does not reach the memory bandwidth (0.9 ms for 4096 x 1024 at N = 1 where reading
  // the 16 MB takes 0.65 ms here, and 4x that at N = 4); dense_dot reads w_up once for all rows.
  // Other dtypes keep at::linear, so their h rounds exactly as F.linear's.
  static at::Tensor up_projection(const at::Tensor& x, const at::Tensor& w_up,
                                  const std::optional<at::Tensor>& b_up) {
    const int64_t N = x.size(0), d_ff = w_up.size(0), d_model = x.size(1);
    if (N > kMaxDenseRows || N == 0 || x.scalar_type() != at::kFloat)
      return at::linear(x, w_up, b_up);
    const at::Tensor xc = x.contiguous(), w = w_up.contiguous();
    at::Tensor h = at::empty({N, d_ff}, xc.options());
    const float* xp = xc.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    const at::Tensor b = b_up.has_value() ? b_up->contiguous() : at::Tensor();  // a sliced or expanded bias
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const double row_ns = work_ns(double(N) * d_model, d_model * sizeof(float));
    parallel_for(0, d_ff, parallel_grain(row_ns), [&](int64_t i0, int64_t i1) {
      dense_dot(N, xp, i0, i1, wp, d_model, hp, d_ff);
      if (bp)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = i0; i < i1; ++i) hp[n * d_ff + i] += bp[i];
    });
    return h;
  }

  static void select(const at::Tensor& h, int64_t k, Activation act, at::Tensor& values,
                     at::Tensor& indices, at::Tensor pre) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "topk_select",
                                    [&] { select_rows<scalar_t>(h, k, act, values, indices, pre); });
  }

  static void gather_rows(const at::Tensor& v, const at::Tensor& indices, const at::Tensor& table,
                          const at::Tensor& bias, at::Tensor& out) {
    const int64_t N = v.size(0), k = v.size(1), d_ff = table.size(0), C = table.size(1);
    const double mac_ns = work_ns(1, table.element_size());  // a row element read and added
    const int64_t threads = planned_threads(mac_ns * N * k * C);
    // Few rows: split the columns over the threads. Many: blocks of rows share a slice.
    const int64_t rows_per_task = N >= 2 * threads ? 8 : 1;
    const int64_t cw = N >= 2 * threads ? std::min<int64_t>(C, 256) : column_block(C, threads);
    const int64_t row_blocks = (N + rows_per_task - 1) / rows_per_task;
    const int64_t col_blocks = (C + cw - 1) / cw;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "gather_rows", [&] {
      using acc_t = acc_type<scalar_t>;
      const acc_t* vp = v.data_ptr<acc_t>();
      const int64_t* ip = indices.data_ptr<int64_t>();
      const scalar_t* tp = table.data_ptr<scalar_t>();
      const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t grain = parallel_grain(mac_ns * rows_per_task * k * cw);
      parallel_for(0, row_blocks * col_blocks, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(cw);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t c0 = (t % col_blocks) * cw, n_cols = std::min(cw, C - c0);
          const int64_t n0 = (t / col_blocks) * rows_per_task;
          for (int64_t n = n0; n < std::min(N, n0 + rows_per_task); ++n) {
            check_row_indices(ip + n * k, k, d_ff);
            for (int64_t c = 0; c < n_cols; ++c) acc[c] = bp ? acc_t(bp[c0 + c]) : acc_t(0);
            gather_axpy(k, vp + n * k, ip + n * k, tp + c0, C, acc.data(), n_cols);
            for (int64_t c = 0; c < n_cols; ++c) op[n * C + c0 + c] = static_cast<scalar_t>(acc[c]);
          }
        }
      });
    });
  }

  static void gather_dot(const at::Tensor& g, const at::Tensor& indices, const at::Tensor& table,
                         at::Tensor& out) {
    const int64_t N = g.size(0), k = indices.size(1), d_ff = table.size(0), C = table.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "gather_dot", [&] {
      using acc_t = acc_type<scalar_t>;
      const acc_t* gp = g.data_ptr<acc_t>();
      const int64_t* ip = indices.data_ptr<int64_t>();
      const scalar_t* tp = table.data_ptr<scalar_t>();
      acc_t* op = out.data_ptr<acc_t>();
      const double pair_ns = work_ns(C, C * sizeof(scalar_t));
      parallel_for(0, N * k, parallel_grain(pair_ns), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end;) {  // runs of pairs within one row
          const int64_t n = p / k, stop = std::min(end, (n + 1) * k);
          check_row_indices(ip + p, stop - p, d_ff);
          ::leanformer::gather_dot(stop - p, gp + n * C, ip + p, tp, C, op + p, C);
          p = stop;
        }
      });
    });
  }

  // Per task: one row's chunk of neurons. Their pre-activations are gathered dot products
  // with w_up's rows, their activations scale a gathered accumulation of w_down_t's rows. For
  // a few rows (decode) each row's k neurons are split into chunks of at least
  // kNeuronsPerSplit (so both the up and the down rows are shared out over the threads) whose
  // fp32 partial outputs are then summed in chunk order; the split depends only on (N, k), not
  // on the thread count, so results are reproducible. From kMaxDenseRows rows on, a task is a
  // whole row.
  static void gather_mlp(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& w_up,
                         const at::Tensor& b_up, const at::Tensor& w_down_t,
                         const at::Tensor& b_down, Activation act, at::Tensor& pre,
                         at::Tensor& out) {
    constexpr int64_t kNeuronsPerSplit = 16, kMaxSplits = 8;
    const int64_t N = x.size(0), C = x.size(1), k = indices.size(1), d_ff = w_up.size(0);
    int64_t splits = N >= kMaxDenseRows ? 1 : std::clamp<int64_t>(k / kNeuronsPerSplit, 1, kMaxSplits);
    const int64_t chunk = std::max<int64_t>(1, (k + splits - 1) / splits);
    splits = std::max<int64_t>(1, (k + chunk - 1) / chunk);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_up.scalar_type(), "gather_mlp", [&] {
      using acc_t = acc_type<scalar_t>;
      const acc_t* xp = x.data_ptr<acc_t>();
      const int64_t* ip = indices.data_ptr<int64_t>();
      const scalar_t* up = w_up.data_ptr<scalar_t>();
      const scalar_t* dp = w_down_t.data_ptr<scalar_t>();
      const scalar_t* bup = b_up.defined() ? b_up.data_ptr<scalar_t>() : nullptr;
      const scalar_t* bdp = b_down.defined() ? b_down.data_ptr<scalar_t>() : nullptr;
      scalar_t* pp = pre.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      std::vector<acc_t> partial(splits > 1 ? N * splits * C : 0);
      const double task_ns = work_ns(2.0 * chunk * C, 2.0 * chunk * C * sizeof(scalar_t));
      parallel_for(0, N * splits, parallel_grain(task_ns), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> a(chunk), row(splits > 1 ? 0 : C);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / splits, j0 = (t % splits) * chunk;
          const int64_t m = std::max<int64_t>(0, std::min(chunk, k - j0));  // 0 when k = 0
          const int64_t* ix = ip + n * k + j0;
          check_row_indices(ix, m, d_ff);
          acc_t* acc = splits > 1 ? partial.data() + t * C : row.data();
          for (int64_t c = 0; c < C; ++c) acc[c] = (splits == 1 && bdp) ? acc_t(bdp[c]) : acc_t(0);
          ::leanformer::gather_dot(m, xp + n * C, ix, up, C, a.data(), C);
          for (int64_t j = 0; j < m; ++j) {
            const scalar_t h = static_cast<scalar_t>(a[j] + (bup ? acc_t(bup[ix[j]]) : acc_t(0)));
            pp[n * k + j0 + j] = h;
            const acc_t hv = static_cast<acc_t>(h);
            a[j] = act == Activation::kGelu ? acc_t(0.5) * hv * (acc_t(1) + std::erf(hv * acc_t(M_SQRT1_2)))
                                            : activate(hv, act);
          }
          gather_axpy(m, a.data(), ix, dp, C, acc, C);
          if (splits == 1)
            for (int64_t c = 0; c < C; ++c) op[n * C + c] = static_cast<scalar_t>(acc[c]);
        }
      });
      if (splits > 1)  // N < kMaxDenseRows rows of C values: a few microseconds, serial
        for (int64_t n = 0; n < N; ++n)
          for (int64_t c = 0; c < C; ++c) {
            acc_t total = bdp ? acc_t(bdp[c]) : acc_t(0);
            for (int64_t sp = 0; sp < splits; ++sp) total += partial[(n * splits + sp) * C + c];
            op[n * C + c] = static_cast<scalar_t>(total);
          }
    });
  }

  static void scatter_rows(const at::Tensor& v, const at::Tensor& indices, const at::Tensor& g,
                           at::Tensor& out) {
    // Tasks own column blocks of every output row: no two write the same element, and the
    // sum order is fixed (deterministic).
    const int64_t N = v.size(0), k = v.size(1), d_ff = out.size(0), C = out.size(1);
    const double mac_ns = work_ns(1, 2 * out.element_size());  // an output element read and written
    const int64_t cw = column_block(C, 4 * planned_threads(mac_ns * N * k * C));
    const int64_t col_blocks = (C + cw - 1) / cw;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "scatter_rows", [&] {
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const int64_t* ip = indices.data_ptr<int64_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      parallel_for(0, col_blocks, parallel_grain(mac_ns * N * k * cw), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t c0 = b * cw, n_cols = std::min(cw, C - c0);
          for (int64_t n = 0; n < N; ++n) {
            check_row_indices(ip + n * k, k, d_ff);
            for (int64_t j = 0; j < k; ++j)
              axpy(vp[n * k + j], gp + n * C + c0, op + ip[n * k + j] * C + c0, n_cols);
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { register_topk_mlp_ops<CpuKernels>(m); }

}  // namespace leanformer
