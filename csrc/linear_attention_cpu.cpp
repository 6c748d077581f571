// Simplified linear attention (SLAB) on the CPU: one (batch, head) per task, chunks of
// kChunk tokens copied into zero-padded fp32 tiles (ReLU and dtype conversion fused into
// the copy) so every product is a full-tile GEMM on cache-resident data.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "linear_attention_checks.h"
#include "small_gemm.h"

namespace leanformer {
namespace {

constexpr int64_t kChunk = 64;

// One head of a [B, T, H, D] tensor with arbitrary strides.
template <typename T>
struct Head {
  T* ptr;
  int64_t stride_t, stride_d;
  T* row(int64_t t) const { return ptr + t * stride_t; }
};

template <typename T>
Head<T> head_of(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<T>() + b * x.stride(0) + h * x.stride(2), x.stride(1), x.stride(3)};
}

// Rows [t0, t0 + n) of a head into a zero-padded [kChunk, Dp] tile and, if `tile_t` is
// given, also its transpose [Dp, kChunk] (cheaper here than a separate transpose pass).
template <typename scalar_t, typename acc_t>
void load_tile(const Head<scalar_t>& x, int64_t t0, int64_t n, int64_t D, int64_t Dp, bool relu,
               acc_t* tile, acc_t* tile_t = nullptr) {
  std::fill(tile + n * Dp, tile + kChunk * Dp, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = x.row(t0 + i);
    acc_t* dst = tile + i * Dp;
    std::fill(dst + D, dst + Dp, acc_t(0));
    if (x.stride_d == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * x.stride_d]);
    }
    if (relu)
      for (int64_t d = 0; d < D; ++d) dst[d] = std::max(dst[d], acc_t(0));
  }
  if (tile_t) transpose(tile, kChunk, Dp, tile_t);
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* tile, int64_t n, int64_t D, int64_t Dp, const Head<scalar_t>& x,
                int64_t t0) {
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* dst = x.row(t0 + i);
    const acc_t* src = tile + i * Dp;
    if (x.stride_d == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * x.stride_d] = static_cast<scalar_t>(src[d]);
    }
  }
}

// ReLU's derivative from the features: relu(x) > 0 exactly where x > 0.
template <typename acc_t>
void relu_grad_inplace(acc_t* grad, const acc_t* features, int64_t size) {
  for (int64_t i = 0; i < size; ++i) grad[i] = features[i] > acc_t(0) ? grad[i] : acc_t(0);
}

template <typename acc_t>
void add_colsum(const acc_t* tile, int64_t rows, int64_t Dp, acc_t* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < Dp; ++d) out[d] += tile[i * Dp + d];
}

// out[d] += sum_i tile[i, d] * w[i]
template <typename acc_t>
void add_weighted_colsum(const acc_t* tile, const acc_t* w, int64_t rows, int64_t Dp, acc_t* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < Dp; ++d) out[d] += tile[i * Dp + d] * w[i];
}

// tile[i, :] += w[i] * row
template <typename acc_t>
void add_outer(acc_t* tile, const acc_t* w, const acc_t* row, int64_t rows, int64_t Dp) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < Dp; ++d) tile[i * Dp + d] += w[i] * row[d];
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Copies between a padded [Dkp, Dvp] state and its [Dk, Dv] tensor slice.
template <typename acc_t>
void load_state(const at::Tensor& S, const at::Tensor& z, int64_t b, int64_t h, int64_t Dk,
                int64_t Dv, int64_t Dvp, acc_t* Sp, acc_t* zp) {
  const acc_t* s = S.data_ptr<acc_t>() + (b * S.size(1) + h) * Dk * Dv;
  const acc_t* zz = z.data_ptr<acc_t>() + (b * z.size(1) + h) * Dk;
  for (int64_t i = 0; i < Dk; ++i) {
    std::copy(s + i * Dv, s + (i + 1) * Dv, Sp + i * Dvp);
    zp[i] = zz[i];
  }
}

template <typename acc_t>
void store_state(const acc_t* Sp, const acc_t* zp, int64_t Dk, int64_t Dv, int64_t Dvp,
                 at::Tensor& S, at::Tensor& z, int64_t b, int64_t h) {
  acc_t* s = S.data_ptr<acc_t>() + (b * S.size(1) + h) * Dk * Dv;
  acc_t* zz = z.data_ptr<acc_t>() + (b * z.size(1) + h) * Dk;
  for (int64_t i = 0; i < Dk; ++i) {
    std::copy(Sp + i * Dvp, Sp + i * Dvp + Dv, s + i * Dv);
    zz[i] = zp[i];
  }
}

// Tiles of one task, reused across the heads it processes. Row-major [kChunk, D] unless
// named *t (transposed). S is [Dkp, Dvp]; St its transpose.
template <typename acc_t>
struct Tiles {
  int64_t Dkp, Dvp;
  std::vector<acc_t> q, k, kt, v, vt, a, da, num, scratch, dq, dk, dv, S, St, z, G, Gt, g, den,
      dden;
  Tiles(int64_t Dk, int64_t Dv)
      : Dkp(round_up(std::max<int64_t>(Dk, 1), kGemmColBlock)),
        Dvp(round_up(std::max<int64_t>(Dv, 1), kGemmColBlock)),
        q(kChunk * Dkp), k(kChunk * Dkp), kt(kChunk * Dkp), v(kChunk * Dvp), vt(kChunk * Dvp),
        a(kChunk * kChunk), da(kChunk * kChunk), num(kChunk * Dvp), scratch(kChunk * Dvp),
        dq(kChunk * Dkp), dk(kChunk * Dkp), dv(kChunk * Dvp), S(Dkp * Dvp), St(Dkp * Dvp),
        z(Dkp), G(Dkp * Dvp), Gt(Dkp * Dvp), g(Dkp), den(kChunk), dden(kChunk) {}
};

template <typename acc_t>
void zero_lower_triangle_above_diagonal(acc_t* m) {
  for (int64_t i = 0; i < kChunk; ++i) std::fill(m + i * kChunk + i + 1, m + (i + 1) * kChunk, acc_t(0));
}

// A = tril(Qc Kc^T) including the diagonal (token i sees j <= i of its chunk); den = the
// intra-chunk row sums plus Qc z_prev + eps.
template <typename acc_t>
void causal_scores(Tiles<acc_t>& w, const acc_t* z_prev, acc_t eps) {
  gemm(false, kChunk, kChunk, w.Dkp, w.q.data(), w.Dkp, w.kt.data(), kChunk, w.a.data(), kChunk,
       false);
  zero_lower_triangle_above_diagonal(w.a.data());
  for (int64_t i = 0; i < kChunk; ++i)
    w.den[i] = std::accumulate(w.a.begin() + i * kChunk, w.a.begin() + i * kChunk + i + 1, acc_t(0)) +
               dot(w.q.data() + i * w.Dkp, z_prev, w.Dkp) + eps;
}

template <typename scalar_t, typename acc_t>
void forward_head(const Head<scalar_t>& q, const Head<scalar_t>& k, const Head<scalar_t>& v,
                  const Head<scalar_t>& o, int64_t T, int64_t Dk, int64_t Dv, bool causal,
                  acc_t eps, Tiles<acc_t>& w) {
  const int64_t Dkp = w.Dkp, Dvp = w.Dvp;
  if (!causal) {
    for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
      const int64_t n = std::min(kChunk, T - t0);
      load_tile(k, t0, n, Dk, Dkp, true, w.k.data());
      load_tile(v, t0, n, Dv, Dvp, false, w.v.data());
      gemm(true, Dkp, Dvp, n, w.k.data(), Dkp, w.v.data(), Dvp, w.S.data(), Dvp, true);
      add_colsum(w.k.data(), n, Dkp, w.z.data());
    }
  }
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    load_tile(q, t0, n, Dk, Dkp, true, w.q.data());
    if (causal) {
      load_tile(k, t0, n, Dk, Dkp, true, w.k.data(), w.kt.data());
      load_tile(v, t0, n, Dv, Dvp, false, w.v.data());
      causal_scores(w, w.z.data(), eps);
      gemm(false, n, Dvp, n, w.a.data(), kChunk, w.v.data(), Dvp, w.num.data(), Dvp, false);
      gemm(false, n, Dvp, Dkp, w.q.data(), Dkp, w.S.data(), Dvp, w.num.data(), Dvp, true);
    } else {
      gemm(false, n, Dvp, Dkp, w.q.data(), Dkp, w.S.data(), Dvp, w.num.data(), Dvp, false);
      for (int64_t i = 0; i < n; ++i) w.den[i] = dot(w.q.data() + i * Dkp, w.z.data(), Dkp) + eps;
    }
    for (int64_t i = 0; i < n; ++i) {
      const acc_t inv = acc_t(1) / w.den[i];
      for (int64_t d = 0; d < Dvp; ++d) w.num[i * Dvp + d] *= inv;
    }
    store_tile(w.num.data(), n, Dv, Dvp, o, t0);
    if (causal) {
      gemm(true, Dkp, Dvp, n, w.k.data(), Dkp, w.v.data(), Dvp, w.S.data(), Dvp, true);
      add_colsum(w.k.data(), n, Dkp, w.z.data());
    }
  }
}

// dnum = dO / den into w.num and dden = -(dO . o) / den into w.dden for the chunk's rows
// (w.den must hold den). Padding rows get zero so they contribute nothing.
template <typename scalar_t, typename acc_t>
void output_grads(const Head<scalar_t>& grad_o, const Head<scalar_t>& o, int64_t t0, int64_t n,
                  int64_t Dv, Tiles<acc_t>& w) {
  const int64_t Dvp = w.Dvp;
  load_tile(grad_o, t0, n, Dv, Dvp, false, w.num.data());
  load_tile(o, t0, n, Dv, Dvp, false, w.scratch.data());
  for (int64_t i = 0; i < kChunk; ++i) {
    if (i >= n) {
      w.dden[i] = 0;
      continue;
    }
    const acc_t inv = acc_t(1) / w.den[i];
    w.dden[i] = -dot(w.num.data() + i * Dvp, w.scratch.data() + i * Dvp, Dvp) * inv;
    for (int64_t d = 0; d < Dvp; ++d) w.num[i * Dvp + d] *= inv;
  }
}

// The state's gradient from this chunk's queries: G += Qc^T dnum, g += Qc^T dden.
template <typename acc_t>
void accumulate_state_grad(Tiles<acc_t>& w, int64_t n) {
  gemm(true, w.Dkp, w.Dvp, n, w.q.data(), w.Dkp, w.num.data(), w.Dvp, w.G.data(), w.Dvp, true);
  add_weighted_colsum(w.q.data(), w.dden.data(), n, w.Dkp, w.g.data());
}

template <typename scalar_t, typename acc_t>
void backward_head(const Head<scalar_t>& grad_o, const Head<scalar_t>& q,
                   const Head<scalar_t>& k, const Head<scalar_t>& v, const Head<scalar_t>& o,
                   const Head<scalar_t>& dq, const Head<scalar_t>& dk, const Head<scalar_t>& dv,
                   int64_t T, int64_t Dk, int64_t Dv, bool causal, acc_t eps, Tiles<acc_t>& w,
                   std::vector<acc_t>& chunk_states) {
  const int64_t Dkp = w.Dkp, Dvp = w.Dvp;
  const int64_t num_chunks = (T + kChunk - 1) / kChunk;
  const int64_t state_size = Dkp * Dvp + Dkp;
  // Pass 1: S^T before every chunk (causal) or the full S^T (non-causal), and z; dq only
  // ever needs S transposed.
  if (causal) chunk_states.resize(num_chunks * state_size);
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t t0 = c * kChunk, n = std::min(kChunk, T - t0);
    if (causal) {
      std::copy(w.St.begin(), w.St.end(), chunk_states.begin() + c * state_size);
      std::copy(w.z.begin(), w.z.end(), chunk_states.begin() + c * state_size + Dkp * Dvp);
    }
    load_tile(k, t0, n, Dk, Dkp, true, w.k.data());
    load_tile(v, t0, n, Dv, Dvp, false, w.v.data());
    gemm(true, Dvp, Dkp, n, w.v.data(), Dvp, w.k.data(), Dkp, w.St.data(), Dkp, true);
    add_colsum(w.k.data(), n, Dkp, w.z.data());
  }

  if (!causal) {
    // dq needs the full sums and dk, dv the full G, g: two more passes.
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t t0 = c * kChunk, n = std::min(kChunk, T - t0);
      load_tile(q, t0, n, Dk, Dkp, true, w.q.data());
      for (int64_t i = 0; i < n; ++i) w.den[i] = dot(w.q.data() + i * Dkp, w.z.data(), Dkp) + eps;
      output_grads(grad_o, o, t0, n, Dv, w);
      gemm(false, n, Dkp, Dvp, w.num.data(), Dvp, w.St.data(), Dkp, w.dq.data(), Dkp, false);
      add_outer(w.dq.data(), w.dden.data(), w.z.data(), n, Dkp);
      relu_grad_inplace(w.dq.data(), w.q.data(), n * Dkp);
      store_tile(w.dq.data(), n, Dk, Dkp, dq, t0);
      accumulate_state_grad(w, n);
    }
    transpose(w.G.data(), Dkp, Dvp, w.Gt.data());
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t t0 = c * kChunk, n = std::min(kChunk, T - t0);
      load_tile(k, t0, n, Dk, Dkp, true, w.k.data());
      load_tile(v, t0, n, Dv, Dvp, false, w.v.data());
      gemm(false, n, Dkp, Dvp, w.v.data(), Dvp, w.Gt.data(), Dkp, w.dk.data(), Dkp, false);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < Dkp; ++d) w.dk[i * Dkp + d] += w.g[d];
      gemm(false, n, Dvp, Dkp, w.k.data(), Dkp, w.G.data(), Dvp, w.dv.data(), Dvp, false);
      relu_grad_inplace(w.dk.data(), w.k.data(), n * Dkp);
      store_tile(w.dk.data(), n, Dk, Dkp, dk, t0);
      store_tile(w.dv.data(), n, Dv, Dvp, dv, t0);
    }
    return;
  }

  // Pass 2 (causal), last chunk first: G, g hold the gradient reaching the state after
  // the current chunk, from the final-state gradient and every later token.
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, n = std::min(kChunk, T - t0);
    const acc_t* St_prev = chunk_states.data() + c * state_size;
    const acc_t* z_prev = St_prev + Dkp * Dvp;
    load_tile(q, t0, n, Dk, Dkp, true, w.q.data());
    load_tile(k, t0, n, Dk, Dkp, true, w.k.data(), w.kt.data());
    load_tile(v, t0, n, Dv, Dvp, false, w.v.data(), w.vt.data());
    causal_scores(w, z_prev, eps);
    output_grads(grad_o, o, t0, n, Dv, w);  // w.num = dnum, w.dden = dden

    // dA = tril(dnum V^T + dden 1^T)
    gemm(false, n, kChunk, Dvp, w.num.data(), Dvp, w.vt.data(), kChunk, w.da.data(), kChunk, false);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) w.da[i * kChunk + j] += w.dden[i];
    std::fill(w.da.begin() + n * kChunk, w.da.end(), acc_t(0));
    zero_lower_triangle_above_diagonal(w.da.data());

    // dQ = dA Kc + dnum S_prev^T + dden z_prev^T
    gemm(false, n, Dkp, n, w.da.data(), kChunk, w.k.data(), Dkp, w.dq.data(), Dkp, false);
    gemm(false, n, Dkp, Dvp, w.num.data(), Dvp, St_prev, Dkp, w.dq.data(), Dkp, true);
    add_outer(w.dq.data(), w.dden.data(), z_prev, n, Dkp);

    // dK = dA^T Qc + Vc G^T + g;  dV = A^T dnum + Kc G
    transpose(w.G.data(), Dkp, Dvp, w.Gt.data());
    gemm(true, n, Dkp, n, w.da.data(), kChunk, w.q.data(), Dkp, w.dk.data(), Dkp, false);
    gemm(false, n, Dkp, Dvp, w.v.data(), Dvp, w.Gt.data(), Dkp, w.dk.data(), Dkp, true);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < Dkp; ++d) w.dk[i * Dkp + d] += w.g[d];
    gemm(true, n, Dvp, n, w.a.data(), kChunk, w.num.data(), Dvp, w.dv.data(), Dvp, false);
    gemm(false, n, Dvp, Dkp, w.k.data(), Dkp, w.G.data(), Dvp, w.dv.data(), Dvp, true);

    relu_grad_inplace(w.dq.data(), w.q.data(), n * Dkp);
    relu_grad_inplace(w.dk.data(), w.k.data(), n * Dkp);
    store_tile(w.dq.data(), n, Dk, Dkp, dq, t0);
    store_tile(w.dk.data(), n, Dk, Dkp, dk, t0);
    store_tile(w.dv.data(), n, Dv, Dvp, dv, t0);
    accumulate_state_grad(w, n);
  }
}

// In the [B, T, H, D] layout a head's rows lie H * D apart; loading 64 of them per tile
// thrashes the same L1 sets (measured: 1.7x slower at H = 8, D = 64). One head-major copy
// of each input up front costs far less.
at::Tensor head_major(const at::Tensor& x) {
  if (x.size(2) <= 1 || (x.stride(3) == 1 && x.stride(1) == x.size(3))) return x;
  return x.transpose(1, 2).contiguous().transpose(1, 2);
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& initial_S, const std::optional<at::Tensor>& initial_z,
    bool causal, double eps) {
  const SlaShape s = check_sla_inputs(q_in, k_in, v_in, initial_S, initial_z, causal);
  const auto q = head_major(q_in), k = head_major(k_in), v = head_major(v_in);
  auto o = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  auto S = at::empty({s.B, s.H, s.Dk, s.Dv}, state_opts);
  auto z = at::empty({s.B, s.H, s.Dk}, state_opts);
  const auto S0 = initial_S ? initial_S->contiguous() : at::Tensor();
  const auto z0 = initial_z ? initial_z->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
      Tiles<acc_t> w(s.Dk, s.Dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.H, h = bh % s.H;
        std::fill(w.S.begin(), w.S.end(), acc_t(0));
        std::fill(w.z.begin(), w.z.end(), acc_t(0));
        if (S0.defined()) load_state(S0, z0, b, h, s.Dk, s.Dv, w.Dvp, w.S.data(), w.z.data());
        forward_head(head_of<scalar_t>(q, b, h), head_of<scalar_t>(k, b, h),
                     head_of<scalar_t>(v, b, h), head_of<scalar_t>(o, b, h), s.T, s.Dk, s.Dv,
                     causal, static_cast<acc_t>(eps), w);
        store_state(w.S.data(), w.z.data(), s.Dk, s.Dv, w.Dvp, S, z, b, h);
      }
    });
  });
  return {o, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sla_backward_cpu(
    const at::Tensor& grad_o_in, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_in, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal, double eps) {
  const SlaShape s = check_sla_inputs(q_in, k_in, v_in, initial_S, initial_z, causal);
  check_sla_grad_output(grad_o_in, o_in, s, q_in);
  const auto q = head_major(q_in), k = head_major(k_in), v = head_major(v_in);
  const auto o = head_major(o_in), grad_o = head_major(grad_o_in);
  check_state(grad_S, grad_z, s, q, "grad_S", "grad_z");
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  auto dS0 = at::empty({s.B, s.H, s.Dk, s.Dv}, state_opts);
  auto dz0 = at::empty({s.B, s.H, s.Dk}, state_opts);
  const auto S0 = initial_S ? initial_S->contiguous() : at::Tensor();
  const auto z0 = initial_z ? initial_z->contiguous() : at::Tensor();
  const auto gS = grad_S ? grad_S->contiguous() : at::Tensor();
  const auto gz = grad_z ? grad_z->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
      Tiles<acc_t> w(s.Dk, s.Dv);
      std::vector<acc_t> chunk_states;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.H, h = bh % s.H;
        for (auto* buf : {&w.S, &w.St, &w.z, &w.G, &w.g}) std::fill(buf->begin(), buf->end(), acc_t(0));
        if (S0.defined()) {
          load_state(S0, z0, b, h, s.Dk, s.Dv, w.Dvp, w.S.data(), w.z.data());
          transpose(w.S.data(), w.Dkp, w.Dvp, w.St.data());
        }
        if (gS.defined()) load_state(gS, gz, b, h, s.Dk, s.Dv, w.Dvp, w.G.data(), w.g.data());
        backward_head(head_of<scalar_t>(grad_o, b, h), head_of<scalar_t>(q, b, h),
                      head_of<scalar_t>(k, b, h), head_of<scalar_t>(v, b, h),
                      head_of<scalar_t>(o, b, h), head_of<scalar_t>(dq, b, h),
                      head_of<scalar_t>(dk, b, h), head_of<scalar_t>(dv, b, h), s.T, s.Dk, s.Dv,
                      causal, static_cast<acc_t>(eps), w, chunk_states);
        store_state(w.G.data(), w.g.data(), s.Dk, s.Dv, w.Dvp, dS0, dz0, b, h);
      }
    });
  });
  return {dq, dk, dv, dS0, dz0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_step_cpu(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const at::Tensor& S,
                                                            const at::Tensor& z, double eps) {
  const SlaShape s = check_sla_step_inputs(q, k, v, S, z);
  auto o = at::empty({s.B, s.H, s.Dv}, q.options());
  auto S_new = at::empty_like(S, at::MemoryFormat::Contiguous);
  auto z_new = at::empty_like(z, at::MemoryFormat::Contiguous);
  const auto Sc = S.contiguous();
  const auto zc = z.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_step_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, s.Dk * s.Dv));
    at::parallel_for(0, s.B * s.H, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> qf(s.Dk), kf(s.Dk), vf(s.Dv), num(s.Dv);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.H, h = bh % s.H;
        const scalar_t* qp = q.data_ptr<scalar_t>() + b * q.stride(0) + h * q.stride(1);
        const scalar_t* kp = k.data_ptr<scalar_t>() + b * k.stride(0) + h * k.stride(1);
        const scalar_t* vp = v.data_ptr<scalar_t>() + b * v.stride(0) + h * v.stride(1);
        for (int64_t d = 0; d < s.Dk; ++d) {
          qf[d] = std::max(static_cast<acc_t>(qp[d * q.stride(2)]), acc_t(0));
          kf[d] = std::max(static_cast<acc_t>(kp[d * k.stride(2)]), acc_t(0));
        }
        for (int64_t d = 0; d < s.Dv; ++d) vf[d] = static_cast<acc_t>(vp[d * v.stride(2)]);
        const acc_t* s_in = Sc.data_ptr<acc_t>() + bh * s.Dk * s.Dv;
        acc_t* s_out = S_new.data_ptr<acc_t>() + bh * s.Dk * s.Dv;
        const acc_t* z_in = zc.data_ptr<acc_t>() + bh * s.Dk;
        acc_t* z_out = z_new.data_ptr<acc_t>() + bh * s.Dk;
        std::fill(num.begin(), num.end(), acc_t(0));
        acc_t den = eps;
        for (int64_t i = 0; i < s.Dk; ++i) {
          const acc_t ki = kf[i], qi = qf[i];
          const acc_t* si = s_in + i * s.Dv;
          acc_t* so = s_out + i * s.Dv;
          for (int64_t j = 0; j < s.Dv; ++j) {
            so[j] = si[j] + ki * vf[j];
            num[j] += qi * so[j];
          }
          z_out[i] = z_in[i] + ki;
          den += qi * z_out[i];
        }
        scalar_t* op = o.data_ptr<scalar_t>() + bh * s.Dv;
        for (int64_t j = 0; j < s.Dv; ++j) op[j] = static_cast<scalar_t>(num[j] / den);
      }
    });
  });
  return {o, S_new, z_new};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("sla_forward", &sla_forward_cpu);
  m.impl("sla_backward", &sla_backward_cpu);
  m.impl("sla_step", &sla_step_cpu);
}

}  // namespace leanformer
