// tree_dwconv on the CPU: SLAB's causal depthwise convolution of V for every node of a token
// tree, along the node's own ancestor chain continued into the conv tail of the prefix: what
// plain decoding of the node's branch would compute. In PyTorch it took ~8 small ops per layer
// plus a lag table per tree (0.5-0.8 ms of a 3-4 ms SLAB LM tree step on the 2-core AMD EPYC);
// the arithmetic is T * H * D * kernel_size multiply-adds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "grain.h"
#include "tree_state_checks.h"

namespace leanformer {
namespace {

template <typename T>
void dwconv_rows(int64_t r0, int64_t r1, const at::Tensor& v, const at::Tensor& tail, const int64_t* parents,
                 int64_t parents_stride, const T* w, const T* bias, T* out) {
  using acc_t = at::opmath_type<T>;
  const int64_t T_ = v.size(1), H = v.size(2), D = v.size(3), K = tail.size(2) + 1, W = K - 1;
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), vs3 = v.stride(3);
  const int64_t ts0 = tail.stride(0), ts1 = tail.stride(1), ts2 = tail.stride(2);
  const T* vp = v.const_data_ptr<T>();
  const T* tp = tail.const_data_ptr<T>();
  std::vector<int64_t> chain(K);
  std::vector<acc_t> taps(K * D), acc(D);  // taps[l D + d]: lag l's weight (tap K - 1 - l) of channel d
  for (int64_t l = 0; l < K; ++l)
    for (int64_t d = 0; d < D; ++d) taps[l * D + d] = static_cast<acc_t>(w[d * K + K - 1 - l]);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / T_, t = row % T_;
    const int64_t* par = parents + b * parents_stride;
    // chain[l]: the node l steps up from t, or -1 - r for the r-th value back in the tail
    int64_t cur = t;
    for (int64_t l = 0; l < K; ++l) {
      chain[l] = cur;
      cur = cur >= 0 ? par[cur] : cur - 1;
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) acc[d] = bias ? static_cast<acc_t>(bias[d]) : acc_t(0);
      for (int64_t l = 0; l < K; ++l) {  // a row of V (stride vs3, 1 for the runner's) or a tail column
        const int64_t c = chain[l];
        const T* src = c >= 0 ? vp + b * vs0 + c * vs1 + h * vs2 : tp + (b * H + h) * ts0 + (W + c) * ts2;
        const int64_t stride = c >= 0 ? vs3 : ts1;
        const acc_t* tl = taps.data() + l * D;
        if (stride == 1)
          for (int64_t d = 0; d < D; ++d) acc[d] += tl[d] * static_cast<acc_t>(src[d]);
        else
          for (int64_t d = 0; d < D; ++d) acc[d] += tl[d] * static_cast<acc_t>(src[d * stride]);
      }
      T* o = out + ((b * T_ + t) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
    }
  }
}

at::Tensor tree_dwconv_cpu(const at::Tensor& v, const at::Tensor& conv_tail, const at::Tensor& parents_in,
                           const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  check_tree_dwconv_inputs(v, conv_tail, parents_in, weight_in, bias_in);
  check_tree_dwconv_parents(parents_in);
  const int64_t B = v.size(0), T = v.size(1), H = v.size(2), D = v.size(3), K = weight_in.size(1);
  at::Tensor out = at::empty({B, T, H, D}, v.options());
  if (out.numel() == 0) return out;
  const at::Tensor parents = parents_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t ps = parents.dim() == 2 ? T : 0;
  // a node's row: H D K multiply-adds (scalar, through the parents' rows); a SLAB LM tree
  // (19 nodes x 256 channels x 4 taps) stays on one thread
  const int64_t grain = parallel_grain(work_ns(0, 0, double(H) * D * K));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "tree_dwconv", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
      dwconv_rows<scalar_t>(r0, r1, v, conv_tail, parents.const_data_ptr<int64_t>(), ps,
                            weight.const_data_ptr<scalar_t>(), b, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("tree_dwconv", &tree_dwconv_cpu); }

}  // namespace leanformer
