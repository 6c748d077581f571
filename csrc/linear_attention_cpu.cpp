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

#include "grain.h"
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
    if (x.stride_d == 1)  // the next chunk's row, so its DRAM latency overlaps this chunk's work
      for (int64_t d = 0; d < D; d += 64 / sizeof(scalar_t))
        __builtin_prefetch(src + kChunk * x.stride_t + d);
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

// Scratch tiles of one task, shared by the heads it processes. Row-major [kChunk, D]
// unless named *t (transposed).
template <typename acc_t>
struct Scratch {
  int64_t Dkp, Dvp;
  std::vector<acc_t> q, k, kt, v, vt, a, da, num, o, dq, dk, dv, den, dden;
  Scratch(int64_t Dkp_, int64_t Dvp_)
      : Dkp(Dkp_), Dvp(Dvp_), q(kChunk * Dkp), k(kChunk * Dkp), kt(kChunk * Dkp),
        v(kChunk * Dvp), vt(kChunk * Dvp), a(kChunk * kChunk), da(kChunk * kChunk),
        num(kChunk * Dvp), o(kChunk * Dvp), dq(kChunk * Dkp), dk(kChunk * Dkp),
        dv(kChunk * Dvp), den(kChunk), dden(kChunk) {}
};

// What one head carries from chunk to chunk: the state S [Dkp, Dvp] (or its transpose St,
// which is all the backward needs), z, the state gradient G, g, and in the causal backward
// S^T and z before every chunk.
template <typename acc_t>
struct HeadState {
  std::vector<acc_t> S, St, z, G, Gt, g, chunk_states;
  HeadState(int64_t Dkp, int64_t Dvp)
      : S(Dkp * Dvp), St(Dkp * Dvp), z(Dkp), G(Dkp * Dvp), Gt(Dkp * Dvp), g(Dkp) {}
};

template <typename acc_t>
void zero_above_diagonal(acc_t* m) {
  for (int64_t i = 0; i < kChunk; ++i) std::fill(m + i * kChunk + i + 1, m + (i + 1) * kChunk, acc_t(0));
}

// A = tril(Qc Kc^T) including the diagonal (token i sees j <= i of its chunk); den = the
// intra-chunk row sums plus Qc z_prev + eps.
template <typename acc_t>
void causal_scores(Scratch<acc_t>& w, const acc_t* z_prev, acc_t eps) {
  gemm(false, kChunk, kChunk, w.Dkp, w.q.data(), w.Dkp, w.kt.data(), kChunk, w.a.data(), kChunk,
       false);
  zero_above_diagonal(w.a.data());
  for (int64_t i = 0; i < kChunk; ++i)
    w.den[i] = std::accumulate(w.a.begin() + i * kChunk, w.a.begin() + i * kChunk + i + 1, acc_t(0)) +
               dot(w.q.data() + i * w.Dkp, z_prev, w.Dkp) + eps;
}

// Sizes of one op call, with the head dims padded to whole GEMM tiles.
struct Problem {
  int64_t T, Dk, Dv, Dkp, Dvp;
  bool causal;
};

// S += Kc^T Vc, z += colsum(Kc) (or, transposed, St += Vc^T Kc).
template <typename scalar_t, typename acc_t>
void accumulate_state(const Problem& p, const Head<scalar_t>& k, const Head<scalar_t>& v,
                      int64_t t0, int64_t n, Scratch<acc_t>& w, HeadState<acc_t>& st,
                      bool transposed) {
  load_tile(k, t0, n, p.Dk, p.Dkp, true, w.k.data());
  load_tile(v, t0, n, p.Dv, p.Dvp, false, w.v.data());
  if (transposed)
    gemm(true, p.Dvp, p.Dkp, n, w.v.data(), p.Dvp, w.k.data(), p.Dkp, st.St.data(), p.Dkp, true);
  else
    gemm(true, p.Dkp, p.Dvp, n, w.k.data(), p.Dkp, w.v.data(), p.Dvp, st.S.data(), p.Dvp, true);
  add_colsum(w.k.data(), n, p.Dkp, st.z.data());
}

// Outputs of one chunk; causal chunks also advance the state.
template <typename scalar_t, typename acc_t>
void forward_chunk(const Problem& p, const Head<scalar_t>& q, const Head<scalar_t>& k,
                   const Head<scalar_t>& v, const Head<scalar_t>& o, int64_t t0, acc_t eps,
                   Scratch<acc_t>& w, HeadState<acc_t>& st) {
  const int64_t n = std::min(kChunk, p.T - t0), Dkp = p.Dkp, Dvp = p.Dvp;
  load_tile(q, t0, n, p.Dk, Dkp, true, w.q.data());
  if (p.causal) {
    load_tile(k, t0, n, p.Dk, Dkp, true, w.k.data(), w.kt.data());
    load_tile(v, t0, n, p.Dv, Dvp, false, w.v.data());
    causal_scores(w, st.z.data(), eps);
    gemm(false, n, Dvp, n, w.a.data(), kChunk, w.v.data(), Dvp, w.num.data(), Dvp, false);
    gemm(false, n, Dvp, Dkp, w.q.data(), Dkp, st.S.data(), Dvp, w.num.data(), Dvp, true);
  } else {
    gemm(false, n, Dvp, Dkp, w.q.data(), Dkp, st.S.data(), Dvp, w.num.data(), Dvp, false);
    for (int64_t i = 0; i < n; ++i) w.den[i] = dot(w.q.data() + i * Dkp, st.z.data(), Dkp) + eps;
  }
  for (int64_t i = 0; i < n; ++i) {
    const acc_t inv = acc_t(1) / w.den[i];
    for (int64_t d = 0; d < Dvp; ++d) w.num[i * Dvp + d] *= inv;
  }
  store_tile(w.num.data(), n, p.Dv, Dvp, o, t0);
  if (p.causal) {
    gemm(true, Dkp, Dvp, n, w.k.data(), Dkp, w.v.data(), Dvp, st.S.data(), Dvp, true);
    add_colsum(w.k.data(), n, Dkp, st.z.data());
  }
}

// dnum = dO / den into w.num and dden = -(dO . o) / den into w.dden for the chunk's rows
// (w.den must hold den). Padding rows get zero so they contribute nothing.
template <typename scalar_t, typename acc_t>
void output_grads(const Problem& p, const Head<scalar_t>& grad_o,
                  const Head<scalar_t>& o, int64_t t0, int64_t n, Scratch<acc_t>& w) {
  const int64_t Dvp = p.Dvp;
  load_tile(grad_o, t0, n, p.Dv, Dvp, false, w.num.data());
  load_tile(o, t0, n, p.Dv, Dvp, false, w.o.data());
  for (int64_t i = 0; i < kChunk; ++i) {
    if (i >= n) {
      w.dden[i] = 0;
      continue;
    }
    const acc_t inv = acc_t(1) / w.den[i];
    w.dden[i] = -dot(w.num.data() + i * Dvp, w.o.data() + i * Dvp, Dvp) * inv;
    for (int64_t d = 0; d < Dvp; ++d) w.num[i * Dvp + d] *= inv;
  }
}

// The state's gradient from this chunk's queries: G += Qc^T dnum, g += Qc^T dden.
template <typename acc_t>
void accumulate_state_grad(Scratch<acc_t>& w, HeadState<acc_t>& st, int64_t n) {
  gemm(true, w.Dkp, w.Dvp, n, w.q.data(), w.Dkp, w.num.data(), w.Dvp, st.G.data(), w.Dvp, true);
  add_weighted_colsum(w.q.data(), w.dden.data(), n, w.Dkp, st.g.data());
}

// Non-causal backward, second pass: dq from the full sums, and G, g.
template <typename scalar_t, typename acc_t>
void noncausal_dq_chunk(const Problem& p, const Head<scalar_t>& grad_o,
                        const Head<scalar_t>& q, const Head<scalar_t>& o, const Head<scalar_t>& dq,
                        int64_t t0, acc_t eps, Scratch<acc_t>& w, HeadState<acc_t>& st) {
  const int64_t n = std::min(kChunk, p.T - t0), Dkp = p.Dkp, Dvp = p.Dvp;
  load_tile(q, t0, n, p.Dk, Dkp, true, w.q.data());
  for (int64_t i = 0; i < n; ++i) w.den[i] = dot(w.q.data() + i * Dkp, st.z.data(), Dkp) + eps;
  output_grads(p, grad_o, o, t0, n, w);
  gemm(false, n, Dkp, Dvp, w.num.data(), Dvp, st.St.data(), Dkp, w.dq.data(), Dkp, false);
  add_outer(w.dq.data(), w.dden.data(), st.z.data(), n, Dkp);
  relu_grad_inplace(w.dq.data(), w.q.data(), n * Dkp);
  store_tile(w.dq.data(), n, p.Dk, Dkp, dq, t0);
  accumulate_state_grad(w, st, n);
}

// Non-causal backward, third pass: dk = Vc G^T + g, dv = Kc G with the full G, g.
template <typename scalar_t, typename acc_t>
void noncausal_dkdv_chunk(const Problem& p, const Head<scalar_t>& k,
                          const Head<scalar_t>& v, const Head<scalar_t>& dk,
                          const Head<scalar_t>& dv, int64_t t0, Scratch<acc_t>& w,
                          HeadState<acc_t>& st) {
  const int64_t n = std::min(kChunk, p.T - t0), Dkp = p.Dkp, Dvp = p.Dvp;
  load_tile(k, t0, n, p.Dk, Dkp, true, w.k.data());
  load_tile(v, t0, n, p.Dv, Dvp, false, w.v.data());
  gemm(false, n, Dkp, Dvp, w.v.data(), Dvp, st.Gt.data(), Dkp, w.dk.data(), Dkp, false);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < Dkp; ++d) w.dk[i * Dkp + d] += st.g[d];
  gemm(false, n, Dvp, Dkp, w.k.data(), Dkp, st.G.data(), Dvp, w.dv.data(), Dvp, false);
  relu_grad_inplace(w.dk.data(), w.k.data(), n * Dkp);
  store_tile(w.dk.data(), n, p.Dk, Dkp, dk, t0);
  store_tile(w.dv.data(), n, p.Dv, Dvp, dv, t0);
}

// Causal backward of chunk c, last chunk first: st.G, st.g hold the gradient reaching the
// state after this chunk, from the final-state gradient and every later token.
template <typename scalar_t, typename acc_t>
void causal_backward_chunk(const Problem& p, const Head<scalar_t>& grad_o,
                           const Head<scalar_t>& q, const Head<scalar_t>& k,
                           const Head<scalar_t>& v, const Head<scalar_t>& o,
                           const Head<scalar_t>& dq, const Head<scalar_t>& dk,
                           const Head<scalar_t>& dv, int64_t c, acc_t eps, Scratch<acc_t>& w,
                           HeadState<acc_t>& st) {
  const int64_t Dkp = p.Dkp, Dvp = p.Dvp;
  const int64_t t0 = c * kChunk, n = std::min(kChunk, p.T - t0);
  const acc_t* St_prev = st.chunk_states.data() + c * (Dkp * Dvp + Dkp);
  const acc_t* z_prev = St_prev + Dkp * Dvp;
  load_tile(q, t0, n, p.Dk, Dkp, true, w.q.data());
  load_tile(k, t0, n, p.Dk, Dkp, true, w.k.data(), w.kt.data());
  load_tile(v, t0, n, p.Dv, Dvp, false, w.v.data(), w.vt.data());
  causal_scores(w, z_prev, eps);
  output_grads(p, grad_o, o, t0, n, w);  // w.num = dnum, w.dden = dden

  // dA = tril(dnum V^T + dden 1^T)
  gemm(false, n, kChunk, Dvp, w.num.data(), Dvp, w.vt.data(), kChunk, w.da.data(), kChunk, false);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) w.da[i * kChunk + j] += w.dden[i];
  std::fill(w.da.begin() + n * kChunk, w.da.end(), acc_t(0));
  zero_above_diagonal(w.da.data());

  // dQ = dA Kc + dnum S_prev^T + dden z_prev^T
  gemm(false, n, Dkp, n, w.da.data(), kChunk, w.k.data(), Dkp, w.dq.data(), Dkp, false);
  gemm(false, n, Dkp, Dvp, w.num.data(), Dvp, St_prev, Dkp, w.dq.data(), Dkp, true);
  add_outer(w.dq.data(), w.dden.data(), z_prev, n, Dkp);

  // dK = dA^T Qc + Vc G^T + g;  dV = A^T dnum + Kc G
  transpose(st.G.data(), Dkp, Dvp, st.Gt.data());
  gemm(true, n, Dkp, n, w.da.data(), kChunk, w.q.data(), Dkp, w.dk.data(), Dkp, false);
  gemm(false, n, Dkp, Dvp, w.v.data(), Dvp, st.Gt.data(), Dkp, w.dk.data(), Dkp, true);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < Dkp; ++d) w.dk[i * Dkp + d] += st.g[d];
  gemm(true, n, Dvp, n, w.a.data(), kChunk, w.num.data(), Dvp, w.dv.data(), Dvp, false);
  gemm(false, n, Dvp, Dkp, w.k.data(), Dkp, st.G.data(), Dvp, w.dv.data(), Dvp, true);

  relu_grad_inplace(w.dq.data(), w.q.data(), n * Dkp);
  relu_grad_inplace(w.dk.data(), w.k.data(), n * Dkp);
  store_tile(w.dq.data(), n, p.Dk, Dkp, dq, t0);
  store_tile(w.dk.data(), n, p.Dk, Dkp, dk, t0);
  store_tile(w.dv.data(), n, p.Dv, Dvp, dv, t0);
  accumulate_state_grad(w, st, n);
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Tasks are (batch, group of heads), and inside a task the loop runs chunk by chunk over
// all its heads. In [B, T, H, D] one head's rows lie H * D apart; walking one head at a
// time through the whole sequence defeats the prefetchers (measured 1.6x slower in the
// backward at H = 8, D = 64), while a chunk of all the task's heads is one contiguous block.
// A head's forward: per token its chunk's scores and outputs (2 kChunk (Dk + Dv) multiply-adds)
// and its share of the state update and read (2 Dk Dv); the backward does about twice that.
template <typename F>
void for_each_head_group(const SlaShape& s, const F& fn) {
  if (s.B * s.H == 0) return;
  const double head_ns = work_ns(double(s.T) * (2 * kChunk * (s.Dk + s.Dv) + 2 * s.Dk * s.Dv), 0);
  const int64_t threads = planned_threads(head_ns * s.B * s.H);
  const int64_t groups = std::min<int64_t>(s.H, std::max<int64_t>(1, (threads + s.B - 1) / std::max<int64_t>(s.B, 1)));
  const int64_t per_group = (s.H + groups - 1) / groups;
  parallel_for(0, s.B * groups, parallel_grain(head_ns * per_group), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / groups, h0 = (task % groups) * per_group;
      const int64_t h1 = std::min(s.H, h0 + per_group);
      if (h0 < h1) fn(b, h0, h1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_S, const std::optional<at::Tensor>& initial_z,
    bool causal, double eps) {
  const SlaShape s = check_sla_inputs(q, k, v, initial_S, initial_z, causal);
  auto o = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  auto S = at::empty({s.B, s.H, s.Dk, s.Dv}, state_opts);
  auto z = at::empty({s.B, s.H, s.Dk}, state_opts);
  const auto S0 = initial_S ? initial_S->contiguous() : at::Tensor();
  const auto z0 = initial_z ? initial_z->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t Dkp = round_up(std::max<int64_t>(s.Dk, 1), kGemmColBlock);
    const int64_t Dvp = round_up(std::max<int64_t>(s.Dv, 1), kGemmColBlock);
    const Problem p{s.T, s.Dk, s.Dv, Dkp, Dvp, causal};
    const acc_t e = static_cast<acc_t>(eps);
    for_each_head_group(s, [&](int64_t b, int64_t h0, int64_t h1) {
      Scratch<acc_t> w(Dkp, Dvp);
      std::vector<HeadState<acc_t>> states(h1 - h0, HeadState<acc_t>(Dkp, Dvp));
      if (S0.defined())
        for (int64_t h = h0; h < h1; ++h)
          load_state(S0, z0, b, h, s.Dk, s.Dv, Dvp, states[h - h0].S.data(), states[h - h0].z.data());
      if (!causal)
        for (int64_t t0 = 0; t0 < s.T; t0 += kChunk)
          for (int64_t h = h0; h < h1; ++h)
            accumulate_state(p, head_of<scalar_t>(k, b, h), head_of<scalar_t>(v, b, h), t0,
                             std::min(kChunk, s.T - t0), w, states[h - h0], false);
      for (int64_t t0 = 0; t0 < s.T; t0 += kChunk)
        for (int64_t h = h0; h < h1; ++h)
          forward_chunk(p, head_of<scalar_t>(q, b, h), head_of<scalar_t>(k, b, h),
                        head_of<scalar_t>(v, b, h), head_of<scalar_t>(o, b, h), t0, e, w,
                        states[h - h0]);
      for (int64_t h = h0; h < h1; ++h)
        store_state(states[h - h0].S.data(), states[h - h0].z.data(), s.Dk, s.Dv, Dvp, S, z, b, h);
    });
  });
  return {o, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sla_backward_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal, double eps) {
  const SlaShape s =
      check_sla_backward_inputs(grad_o, grad_S, grad_z, q, k, v, o, initial_S, initial_z, causal);
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
    const int64_t Dkp = round_up(std::max<int64_t>(s.Dk, 1), kGemmColBlock);
    const int64_t Dvp = round_up(std::max<int64_t>(s.Dv, 1), kGemmColBlock);
    const Problem p{s.T, s.Dk, s.Dv, Dkp, Dvp, causal};
    const acc_t e = static_cast<acc_t>(eps);
    const int64_t num_chunks = (s.T + kChunk - 1) / kChunk;
    const int64_t state_size = Dkp * Dvp + Dkp;
    for_each_head_group(s, [&](int64_t b, int64_t h0, int64_t h1) {
      Scratch<acc_t> w(Dkp, Dvp);
      std::vector<HeadState<acc_t>> states(h1 - h0, HeadState<acc_t>(Dkp, Dvp));
      auto head = [&](const at::Tensor& x, int64_t h) { return head_of<scalar_t>(x, b, h); };
      for (int64_t h = h0; h < h1; ++h) {
        auto& st = states[h - h0];
        if (S0.defined()) {
          load_state(S0, z0, b, h, s.Dk, s.Dv, Dvp, st.S.data(), st.z.data());
          transpose(st.S.data(), Dkp, Dvp, st.St.data());
        }
        if (gS.defined()) load_state(gS, gz, b, h, s.Dk, s.Dv, Dvp, st.G.data(), st.g.data());
        if (causal) st.chunk_states.resize(num_chunks * state_size);
      }
      // Pass 1: S^T (all dq needs) and z before every chunk (causal) or in full (non-causal).
      for (int64_t c = 0; c < num_chunks; ++c)
        for (int64_t h = h0; h < h1; ++h) {
          auto& st = states[h - h0];
          if (causal) {
            std::copy(st.St.begin(), st.St.end(), st.chunk_states.begin() + c * state_size);
            std::copy(st.z.begin(), st.z.end(), st.chunk_states.begin() + c * state_size + Dkp * Dvp);
          }
          accumulate_state(p, head(k, h), head(v, h), c * kChunk, std::min(kChunk, s.T - c * kChunk),
                           w, st, true);
        }
      if (causal) {
        for (int64_t c = num_chunks - 1; c >= 0; --c)
          for (int64_t h = h0; h < h1; ++h)
            causal_backward_chunk(p, head(grad_o, h), head(q, h), head(k, h), head(v, h), head(o, h),
                                  head(dq, h), head(dk, h), head(dv, h), c, e, w, states[h - h0]);
      } else {
        for (int64_t c = 0; c < num_chunks; ++c)
          for (int64_t h = h0; h < h1; ++h)
            noncausal_dq_chunk(p, head(grad_o, h), head(q, h), head(o, h), head(dq, h), c * kChunk,
                               e, w, states[h - h0]);
        for (auto& st : states) transpose(st.G.data(), Dkp, Dvp, st.Gt.data());
        for (int64_t c = 0; c < num_chunks; ++c)
          for (int64_t h = h0; h < h1; ++h)
            noncausal_dkdv_chunk(p, head(k, h), head(v, h), head(dk, h), head(dv, h), c * kChunk, w,
                                 states[h - h0]);
      }
      for (int64_t h = h0; h < h1; ++h)
        store_state(states[h - h0].G.data(), states[h - h0].g.data(), s.Dk, s.Dv, Dvp, dS0, dz0, b, h);
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
    // per head: the state read, updated and written (2 Dk Dv multiply-adds)
    const double head_ns = work_ns(2.0 * s.Dk * s.Dv, 2.0 * s.Dk * s.Dv * sizeof(acc_t));
    parallel_for(0, s.B * s.H, parallel_grain(head_ns), [&](int64_t begin, int64_t end) {
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
