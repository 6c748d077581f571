// Tree linear attention on the CPU. A task is one (sequence, head): the tree's ReLU features
// as tiles, A = phi(Q) phi(K)^T [T, T] under the ancestor mask, then
// num = phi(Q) S + A V and den = phi(Q) z + rowsum(A) + eps, all as small GEMMs in fp32
// (fp64 for fp64). The prefix enters only through the state (S, z), so the cost does not
// depend on the prefix length.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "grain.h"
#include "small_gemm.h"
#include "tree_attention_checks.h"

namespace leanformer {
namespace {

// Head h of sequence b of a [B, T, H, D] tensor as a zero-padded acc_t tile [T, ld], with
// ReLU applied when relu (the feature map phi).
template <typename scalar_t, typename acc_t>
void load_head(const at::Tensor& x, int64_t b, int64_t h, int64_t ld, bool relu, acc_t* tile) {
  // Sizes and strides in locals: Tensor::stride() is an out-of-line call the compiler cannot
  // hoist out of the element loop (it was most of this kernel's time).
  const int64_t T = x.size(1), D = x.size(3), stride_t = x.stride(1), stride_d = x.stride(3);
  const scalar_t* base = x.const_data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(2);
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* src = base + t * stride_t;
    acc_t* dst = tile + t * ld;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t v = static_cast<acc_t>(src[d * stride_d]);
      dst[d] = relu ? std::max(v, acc_t(0)) : v;
    }
    std::fill(dst + D, dst + ld, acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
void tree_linear_head(const TreeLinearShape& s, int64_t b, int64_t h, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const acc_t* S, const acc_t* z,
                      const bool* mask, acc_t eps, at::Tensor& out) {
  const int64_t T = s.T, Tp = round_up(T, kGemmColBlock), Dvp = round_up(std::max<int64_t>(s.Dv, 1), kGemmColBlock);
  std::vector<acc_t> Q(T * s.Dk), K(T * s.Dk), Kt(s.Dk * Tp, acc_t(0)), V(T * Dvp), Sp(s.Dk * Dvp);
  std::vector<acc_t> A(T * Tp), num(T * Dvp);
  load_head<scalar_t, acc_t>(q, b, h, s.Dk, true, Q.data());
  load_head<scalar_t, acc_t>(k, b, h, s.Dk, true, K.data());
  load_head<scalar_t, acc_t>(v, b, h, Dvp, false, V.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < s.Dk; ++d) Kt[d * Tp + t] = K[t * s.Dk + d];
  for (int64_t d = 0; d < s.Dk; ++d) {
    std::copy(S + d * s.Dv, S + (d + 1) * s.Dv, Sp.data() + d * Dvp);
    std::fill(Sp.data() + d * Dvp + s.Dv, Sp.data() + (d + 1) * Dvp, acc_t(0));
  }
  gemm(false, T, Tp, s.Dk, Q.data(), s.Dk, Kt.data(), Tp, A.data(), Tp, false);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < Tp; ++j)
      if (j >= T || !mask[i * T + j]) A[i * Tp + j] = acc_t(0);
  gemm(false, T, Dvp, s.Dk, Q.data(), s.Dk, Sp.data(), Dvp, num.data(), Dvp, false);
  gemm(false, T, Dvp, T, A.data(), Tp, V.data(), Dvp, num.data(), Dvp, true);

  scalar_t* o = out.data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(2);
  const int64_t out_stride_t = out.stride(1);
  for (int64_t i = 0; i < T; ++i) {
    acc_t den = eps;
    for (int64_t d = 0; d < s.Dk; ++d) den += Q[i * s.Dk + d] * z[d];
    for (int64_t j = 0; j < T; ++j) den += A[i * Tp + j];
    scalar_t* dst = o + i * out_stride_t;
    for (int64_t e = 0; e < s.Dv; ++e) dst[e] = static_cast<scalar_t>(num[i * Dvp + e] / den);
  }
}

at::Tensor tree_linear_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& S_in, const at::Tensor& z_in,
                                     const at::Tensor& tree_mask_in, double eps) {
  const TreeLinearShape s = check_tree_linear_attention_inputs(q, k, v, S_in, z_in, tree_mask_in);
  const at::Tensor S = S_in.contiguous(), z = z_in.contiguous(), tree_mask = tree_mask_in.contiguous();
  at::Tensor out = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  if (out.numel() == 0) return out;
  const bool shared_mask = tree_mask.dim() == 2;
  const bool* mask = tree_mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < (shared_mask ? 1 : s.B); ++b)
    for (int64_t i = 0; i < s.T; ++i) check_tree_mask_diagonal(mask[(b * s.T + i) * s.T + i], b, i);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_linear_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* S_ptr = S.const_data_ptr<acc_t>();
    const acc_t* z_ptr = z.const_data_ptr<acc_t>();
    // per (sequence, head): the tree's scores and outputs (T^2 (Dk + Dv)) and the state read (T Dk Dv)
    const double head_ns = work_ns(double(s.T) * (s.T * (s.Dk + s.Dv) + 2 * s.Dk * s.Dv), 0);
    parallel_for(0, s.B * s.H, parallel_grain(head_ns), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.H, h = task % s.H;
        tree_linear_head<scalar_t, acc_t>(s, b, h, q, k, v, S_ptr + task * s.Dk * s.Dv, z_ptr + task * s.Dk,
                                          mask + (shared_mask ? 0 : b * s.T * s.T), static_cast<acc_t>(eps),
                                          out);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("tree_linear_attention", &tree_linear_attention_cpu); }

}  // namespace leanformer
