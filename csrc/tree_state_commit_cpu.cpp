// sla_tree_commit on the CPU: after a SLAB LM verified a token tree, fold the accepted path
// into every layer's recurrent state in one call (S += relu(k)^T v, z += relu(k), the conv tail
// continued by the path's V): as plain decoding of those tokens would have left it. In PyTorch
// this is ~40 small ops per decoding step (stack, gather, einsum, cat, ...), ~1 ms on the
// 2-core dev machine; the arithmetic is a few hundred thousand multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "grain.h"
#include "tree_state_checks.h"

namespace leanformer {
namespace {

template <typename state_t, typename kv_t>
void commit_layer(at::Tensor& S, at::Tensor& z, const at::Tensor& k, const at::Tensor& v, const int64_t* path,
                  int64_t path_stride, const int64_t* num, int64_t b, int64_t h) {
  const int64_t Dk = S.size(2), Dv = S.size(3);
  state_t* Sp = S.data_ptr<state_t>() + b * S.stride(0) + h * S.stride(1);
  state_t* zp = z.data_ptr<state_t>() + b * z.stride(0) + h * z.stride(1);
  const kv_t* kb = k.const_data_ptr<kv_t>() + b * k.stride(0) + h * k.stride(2);
  const kv_t* vb = v.const_data_ptr<kv_t>() + b * v.stride(0) + h * v.stride(2);
  std::vector<state_t> vrow(Dv);
  for (int64_t j = 0; j < num[b]; ++j) {
    const int64_t node = path[b * path_stride + j];
    const kv_t* kr = kb + node * k.stride(1);
    const kv_t* vr = vb + node * v.stride(1);
    for (int64_t e = 0; e < Dv; ++e) vrow[e] = static_cast<state_t>(vr[e * v.stride(3)]);
    for (int64_t d = 0; d < Dk; ++d) {
      const state_t kd = static_cast<state_t>(kr[d * k.stride(3)]);
      if (!(kd > 0)) continue;  // relu(k) = 0 adds nothing
      zp[d * z.stride(2)] += kd;
      state_t* Srow = Sp + d * S.stride(2);
      for (int64_t e = 0; e < Dv; ++e) Srow[e] += kd * vrow[e];  // S's last dim is contiguous (checked)
    }
  }
}

// The tail [B*H, D, ks-1] (oldest first) of the sequence "old tail ++ V[path]": position p < ks-1
// of that sequence is the old tail's, p >= ks-1 is node path[p - (ks-1)].
template <typename tail_t, typename kv_t>
void commit_tail(at::Tensor& tail, const at::Tensor& v, const int64_t* path, int64_t path_stride, const int64_t* num,
                 int64_t b, int64_t h, int64_t H) {
  const int64_t D = tail.size(1), W = tail.size(2);
  tail_t* t = tail.data_ptr<tail_t>() + (b * H + h) * tail.stride(0);
  std::vector<tail_t> old(D * W);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = 0; r < W; ++r) old[d * W + r] = t[d * tail.stride(1) + r * tail.stride(2)];
  const kv_t* vb = v.const_data_ptr<kv_t>() + b * v.stride(0) + h * v.stride(2);
  for (int64_t r = 0; r < W; ++r) {
    const int64_t p = num[b] + r;  // the last W positions of W + num[b]
    for (int64_t d = 0; d < D; ++d)
      t[d * tail.stride(1) + r * tail.stride(2)] =
          p < W ? old[d * W + p] : static_cast<tail_t>(vb[path[b * path_stride + p - W] * v.stride(1) + d * v.stride(3)]);
  }
}

void sla_tree_commit_cpu(at::TensorList S, at::TensorList z, at::TensorList conv_tail, at::TensorList k,
                         at::TensorList v, const at::Tensor& path_in, const at::Tensor& num_accepted_in) {
  check_sla_tree_commit_inputs(S, z, conv_tail, k, v, path_in, num_accepted_in);
  check_sla_tree_commit_values(k, path_in, num_accepted_in);
  // Written in place through their strides: a tensor whose elements share memory (stride 0, an
  // expanded view) would take each update several times, from racing threads. Refused before
  // any write, as PyTorch's in-place ops refuse it.
  for (size_t l = 0; l < S.size(); ++l) {
    at::assert_no_internal_overlap(S[l]);
    at::assert_no_internal_overlap(z[l]);
    if (!conv_tail.empty()) at::assert_no_internal_overlap(conv_tail[l]);
  }
  const at::Tensor path = path_in.contiguous(), num_accepted = num_accepted_in.contiguous();
  const int64_t L = S.size(), B = S[0].size(0), H = S[0].size(1);
  const int64_t* p = path.const_data_ptr<int64_t>();
  const int64_t* num = num_accepted.const_data_ptr<int64_t>();
  const int64_t ps = path.size(1);
  // per (layer, sequence, head): each accepted node's k v^T added to the state (Dk Dv), and the
  // dispatch of two small kernels
  int64_t accepted = 0;
  for (int64_t b = 0; b < B; ++b) accepted += num[b];
  const double item_ns = work_ns(double(accepted) / std::max<int64_t>(B, 1) * S[0].size(2) * S[0].size(3), 0, 100);
  parallel_for(0, L * B * H, parallel_grain(item_ns), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / (B * H), b = i / H % B, h = i % H;
      at::Tensor Sl = S[l], zl = z[l];
      AT_DISPATCH_FLOATING_TYPES(Sl.scalar_type(), "sla_tree_commit", [&] {
        using state_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k[l].scalar_type(), "sla_tree_commit", [&] {
          commit_layer<state_t, scalar_t>(Sl, zl, k[l], v[l], p, ps, num, b, h);
        });
      });
      if (!conv_tail.empty() && conv_tail[l].size(2)) {
        at::Tensor tl = conv_tail[l];
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tl.scalar_type(), "sla_tree_commit_tail", [&] {
          using tail_t = scalar_t;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v[l].scalar_type(), "sla_tree_commit_tail", [&] {
            commit_tail<tail_t, scalar_t>(tl, v[l], p, ps, num, b, h, H);
          });
        });
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("sla_tree_commit", &sla_tree_commit_cpu); }

}  // namespace leanformer
