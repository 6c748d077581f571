// The launchers of simplified linear attention (kernels and geometry:
// linear_attention_kernels.cuh): checks, allocation, dtype dispatch and the launch sequence on
// the current stream. Compiled by nvcc, and by the emulation build, where the same launchers
// run the kernels on the CPU (launch.h).
#include "../linear_attention_checks.h"
#include "launch.h"
#include "linear_attention_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

namespace leanformer {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side.

void check_cuda_limits(const SlaShape& s) {
  TORCH_CHECK(s.Dk <= kMaxDk, "leanformer sla CUDA kernels support head dim Dk <= ", kMaxDk,
              " (a thread keeps its slice of a state column in registers), got Dk = ", s.Dk);
  TORCH_CHECK((s.Dv + kTile - 1) / kTile <= kMaxGridYZ,
              "leanformer sla CUDA kernels support head dim Dv <= ", kMaxGridYZ * kTile,
              ", got Dv = ", s.Dv);
  TORCH_CHECK(s.B * s.H <= INT_MAX, "leanformer sla CUDA kernels support B * H <= ", INT_MAX,
              ", got ", s.B * s.H);
  TORCH_CHECK(s.B * s.T * s.H / kWarps < INT_MAX,
              "leanformer sla CUDA kernels support B * T * H < ", int64_t(INT_MAX) * kWarps,
              ", got ", s.B * s.T * s.H);
}

struct ScanLaunch {
  dim3 grid;
  int64_t split_len;
};

// One block per (b * H + h, v tile, time split). A tile always exists, even for Dv = 0,
// because tile 0 also carries the z column. split_time spreads T over blocks (non-causal),
// never beyond the grid's z limit.
ScanLaunch scan_launch(const SlaShape& s, bool split_time) {
  const int64_t ntile = std::max<int64_t>(1, (s.Dv + kTile - 1) / kTile);
  const int64_t split_len =
      split_time ? std::max(kSplitLen, (s.T + kMaxGridYZ - 1) / kMaxGridYZ) : s.T;
  const int64_t nsplit = (s.T + split_len - 1) / split_len;
  return {dim3(static_cast<unsigned>(s.B * s.H), static_cast<unsigned>(ntile),
               static_cast<unsigned>(nsplit)),
          split_len};
}

// Calls f(std::integral_constant<int, RPT>) with the smallest rows-per-thread covering Dk.
template <typename F>
void with_rows_per_thread(int64_t Dk, const F& f) {
  if (Dk <= kWarps * 4) {
    f(std::integral_constant<int, 4>{});
  } else if (Dk <= kWarps * 8) {
    f(std::integral_constant<int, 8>{});
  } else if (Dk <= kWarps * 16) {
    f(std::integral_constant<int, 16>{});
  } else {
    f(std::integral_constant<int, kMaxRowsPerThread>{});
  }
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// A gradient of the returned final state, in the state dtype; absent means zero.
std::optional<at::Tensor> state_grad(const std::optional<at::Tensor>& grad,
                                     at::IntArrayRef shape, const at::Tensor& q,
                                     const char* name) {
  if (!grad.has_value() || !grad->defined()) return std::nullopt;
  TORCH_CHECK(grad->sizes() == shape, name, " must have shape ", shape, ", got ", grad->sizes());
  check_same_device(*grad, name, q, "q");
  return grad->to(sla_state_dtype(q.scalar_type())).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& initial_S, const std::optional<at::Tensor>& initial_z,
    bool causal, double eps) {
  const SlaShape s = check_sla_inputs(q, k, v, initial_S, initial_z, causal);
  check_cuda_limits(s);
  const DeviceGuard device_guard(q.device());

  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  at::Tensor o = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  // Zero-initialized: the kernels add their final state atomically.
  at::Tensor S = at::zeros({s.B, s.H, s.Dk, s.Dv}, state_opts);
  at::Tensor z = at::zeros({s.B, s.H, s.Dk}, state_opts);
  if (s.B * s.H == 0) return {o, S, z};
  if (s.T == 0) {
    if (initial_S.has_value()) {
      S.copy_(*initial_S);
      z.copy_(*initial_z);
    }
    return {o, S, z};
  }

  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto S0 = contiguous_opt(initial_S), z0 = contiguous_opt(initial_z);
  const cudaStream_t stream = current_stream();
  const int H = static_cast<int>(s.H), Dk = static_cast<int>(s.Dk), Dv = static_cast<int>(s.Dv);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_forward_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    scalar_t* op = o.data_ptr<scalar_t>();
    acc_t* Sp = S.data_ptr<acc_t>();
    acc_t* zp = z.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);
    with_rows_per_thread(s.Dk, [&](auto rows) {
      constexpr int RPT = decltype(rows)::value;
      if (causal) {
        const ScanLaunch l = scan_launch(s, false);
        launch_kernel(sla_forward_kernel<scalar_t, acc_t, RPT, true, true>, l.grid, kThreads, 0, stream, qp,
                      kp, vp, op, ptr_or_null<acc_t>(S0), ptr_or_null<acc_t>(z0), Sp, zp, s.T, H, Dk, Dv,
                      l.split_len, eps_acc);
      } else {
        // The state is the same for every token: sum it over time splits, then apply it.
        const ScanLaunch l = scan_launch(s, true);
        launch_kernel(sla_forward_kernel<scalar_t, acc_t, RPT, true, false>, l.grid, kThreads, 0, stream,
                      qp, kp, vp, nullptr, nullptr, nullptr, Sp, zp, s.T, H, Dk, Dv, l.split_len, eps_acc);
        launch_kernel(sla_forward_kernel<scalar_t, acc_t, RPT, false, true>, l.grid, kThreads, 0, stream,
                      qp, kp, vp, op, Sp, zp, nullptr, nullptr, s.T, H, Dk, Dv, l.split_len, eps_acc);
      }
    });
  });
  return {o, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sla_backward_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_S,
    const std::optional<at::Tensor>& grad_z, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const std::optional<at::Tensor>& initial_S,
    const std::optional<at::Tensor>& initial_z, bool causal, double eps) {
  const SlaShape s =
      check_sla_backward_inputs(grad_o, grad_S, grad_z, q, k, v, o, initial_S, initial_z, causal);
  check_cuda_limits(s);
  const DeviceGuard device_guard(q.device());

  const auto gS = state_grad(grad_S, {s.B, s.H, s.Dk, s.Dv}, q, "grad_S");
  const auto gz = state_grad(grad_z, {s.B, s.H, s.Dk}, q, "grad_z");
  const auto state_opts = q.options().dtype(sla_state_dtype(q.scalar_type()));
  // dq / dk sum over v tiles atomically, so they accumulate in the state dtype first.
  at::Tensor dq_acc = at::zeros({s.B, s.T, s.H, s.Dk}, state_opts);
  at::Tensor dk_acc = at::zeros({s.B, s.T, s.H, s.Dk}, state_opts);
  at::Tensor dv = at::empty({s.B, s.T, s.H, s.Dv}, q.options());
  at::Tensor G = at::zeros({s.B, s.H, s.Dk, s.Dv}, state_opts);
  at::Tensor g = at::zeros({s.B, s.H, s.Dk}, state_opts);
  const bool no_tokens = s.B * s.H == 0 || s.T == 0;
  // The causal scan starts from grad_S in registers and adds G_0 into zeros. The non-causal
  // sums are split over time, so the buffer starts from grad_S to count it once; with no
  // tokens, G_0 = grad_S and g_0 = grad_z.
  if (!causal || no_tokens) {
    if (gS.has_value()) G.copy_(*gS);
    if (gz.has_value()) g.copy_(*gz);
  }
  if (no_tokens) return {dq_acc.to(q.scalar_type()), dk_acc.to(q.scalar_type()), dv, G, g};

  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor oc = o.contiguous(), dOc = grad_o.contiguous();
  const auto S0 = contiguous_opt(initial_S), z0 = contiguous_opt(initial_z);
  at::Tensor dO_dot_o = at::empty({s.B, s.T, s.H}, state_opts);
  at::Tensor inv_den = at::empty({s.B, s.T, s.H}, state_opts);
  at::Tensor dden = at::empty({s.B, s.T, s.H}, state_opts);
  const cudaStream_t stream = current_stream();
  const int H = static_cast<int>(s.H), Dk = static_cast<int>(s.Dk), Dv = static_cast<int>(s.Dv);
  const int64_t rows = s.B * s.T * s.H;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sla_backward_cuda",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = kc.data_ptr<scalar_t>();
    const scalar_t* vp = vc.data_ptr<scalar_t>();
    const scalar_t* dOp = dOc.data_ptr<scalar_t>();
    acc_t* dotp = dO_dot_o.data_ptr<acc_t>();
    acc_t* inv_denp = inv_den.data_ptr<acc_t>();
    acc_t* ddenp = dden.data_ptr<acc_t>();
    acc_t* Gp = G.data_ptr<acc_t>();
    acc_t* gp = g.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);

    launch_kernel(sla_row_dot_kernel<scalar_t, acc_t>, static_cast<unsigned>((rows + kWarps - 1) / kWarps),
                  kThreads, 0, stream, dOp, oc.data_ptr<scalar_t>(), dotp, rows, Dv);

    with_rows_per_thread(s.Dk, [&](auto rows_per_thread) {
      constexpr int RPT = decltype(rows_per_thread)::value;
      if (causal) {
        const ScanLaunch l = scan_launch(s, false);
        launch_kernel(sla_backward_dq_kernel<scalar_t, acc_t, RPT, true>, l.grid, kThreads, 0, stream, qp,
                      kp, vp, dOp, dotp, ptr_or_null<acc_t>(S0), ptr_or_null<acc_t>(z0), inv_denp, ddenp,
                      dq_acc.data_ptr<acc_t>(), s.T, H, Dk, Dv, l.split_len, eps_acc);
        launch_kernel(sla_backward_dkv_kernel<scalar_t, acc_t, RPT, true, true>, l.grid, kThreads, 0,
                      stream, qp, kp, vp, dOp, inv_denp, ddenp, ptr_or_null<acc_t>(gS),
                      ptr_or_null<acc_t>(gz), Gp, gp, dk_acc.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(),
                      s.T, H, Dk, Dv, l.split_len);
      } else {
        const ScanLaunch l = scan_launch(s, true);
        // Recompute the full sums (S, z) the forward used for every token.
        at::Tensor S_sum = at::zeros({s.B, s.H, s.Dk, s.Dv}, state_opts);
        at::Tensor z_sum = at::zeros({s.B, s.H, s.Dk}, state_opts);
        launch_kernel(sla_forward_kernel<scalar_t, acc_t, RPT, true, false>, l.grid, kThreads, 0, stream,
                      qp, kp, vp, nullptr, nullptr, nullptr, S_sum.data_ptr<acc_t>(),
                      z_sum.data_ptr<acc_t>(), s.T, H, Dk, Dv, l.split_len, eps_acc);
        launch_kernel(sla_backward_dq_kernel<scalar_t, acc_t, RPT, false>, l.grid, kThreads, 0, stream, qp,
                      kp, vp, dOp, dotp, S_sum.data_ptr<acc_t>(), z_sum.data_ptr<acc_t>(), inv_denp, ddenp,
                      dq_acc.data_ptr<acc_t>(), s.T, H, Dk, Dv, l.split_len, eps_acc);
        // G and g are shared by all tokens: sum them over time splits, then apply them.
        launch_kernel(sla_backward_dkv_kernel<scalar_t, acc_t, RPT, true, false>, l.grid, kThreads, 0,
                      stream, qp, kp, vp, dOp, inv_denp, ddenp, nullptr, nullptr, Gp, gp, nullptr, nullptr,
                      s.T, H, Dk, Dv, l.split_len);
        launch_kernel(sla_backward_dkv_kernel<scalar_t, acc_t, RPT, false, true>, l.grid, kThreads, 0,
                      stream, qp, kp, vp, dOp, inv_denp, ddenp, Gp, gp, nullptr, nullptr,
                      dk_acc.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(), s.T, H, Dk, Dv, l.split_len);
      }
    });
  });
  return {dq_acc.to(q.scalar_type()), dk_acc.to(q.scalar_type()), dv, G, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sla_step_cuda(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const at::Tensor& S,
                                                             const at::Tensor& z, double eps) {
  check_sla_step_inputs(q, k, v, S, z);
  // A decode step is the causal forward over one token starting from (S, z); the returned
  // state is freshly allocated, so the inputs are left untouched.
  auto [o, S_new, z_new] =
      sla_forward_cuda(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), S, z, true, eps);
  return {o.squeeze(1), S_new, z_new};
}

LEANFORMER_CUDA_LIBRARY_IMPL(m) {
  m.impl("sla_forward", &sla_forward_cuda);
  m.impl("sla_backward", &sla_backward_cuda);
  m.impl("sla_step", &sla_step_cuda);
}

}  // namespace leanformer
