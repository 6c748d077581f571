// The top-k sparse MLP ops, written once for every backend. Each op checks its arguments,
// flattens the leading dims to rows, allocates, and calls the backend kernels; only those
// differ between CPU (topk_mlp_cpu.cpp) and CUDA (cuda/topk_mlp_cuda.cu):
//
//   select(h [N, d_ff], k, act, values [N, k], indices [N, k], pre [N, k] or undefined)
//       act is kRelu or kIdentity. Per row the k largest act(h) (ranked as rounded to h's
//       dtype; ties -> lowest index), indices ascending; values = act(h[idx]) in h's dtype;
//       pre = h[idx] when defined.
//   gather_rows(v [N, k] acc, indices, table [d_ff, C], bias [C] or undefined, out [N, C])
//       out[n] = bias + sum_j v[n, j] * table[indices[n, j]]     (the sparse down projection)
//   gather_dot(g [N, C] acc, indices, table [d_ff, C], out [N, k] acc)
//       out[n, j] = g[n] . table[indices[n, j]]
//   scatter_rows(v [N, k] acc, indices, g [N, C] acc, out [d_ff, C] acc, zero on entry)
//       out[indices[n, j]] += v[n, j] * g[n]
//   up_projection(x [N, d_model], w_up, b_up) -> h [N, d_ff] in x's dtype (a GEMM; the
//       backend may use its own for the shapes where at::linear is slow)
//   gather_mlp(x [N, d_model] acc, indices [N, k], w_up, b_up or undefined, w_down_t,
//              b_down or undefined, act, pre [N, k], out [N, d_model])
//       pre[n, j] = x[n] . w_up[indices[n, j]] + b_up[...] (rounded to x's dtype);
//       out[n] = b_down + sum_j act(pre[n, j]) * w_down_t[indices[n, j]]   (predicted_sparse_mlp)
//
// Every tensor handed to a kernel is contiguous; acc is fp32 (fp64 for fp64 inputs).
// The backward of topk_mlp is the same gather/scatter kernels: grad_x is a gather of w_up's rows,
// grad_w_up and grad_w_down_t are scatters, so only the k selected neurons cost anything.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "topk_mlp_checks.h"

namespace leanformer {

inline at::Tensor apply_activation(const at::Tensor& pre, Activation act) {
  return act == Activation::kRelu ? at::relu(pre) : at::gelu(pre);
}

// grad * act'(pre); act'(0) = 0 for ReLU, as in F.relu's backward.
inline at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& pre, Activation act) {
  return act == Activation::kRelu ? at::where(pre > 0, grad, at::zeros({}, grad.options()))
                                  : at::gelu_backward(grad, pre);
}

inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  auto out = shape.vec();
  out.back() = last;
  return out;
}

// [..., C] -> contiguous [rows, C] (rows = product of the leading dims, also when C = 0).
inline at::Tensor rows_of(const at::Tensor& t) {
  const auto sizes = t.sizes();
  const int64_t rows = c10::multiply_integers(sizes.begin(), sizes.end() - 1);
  return t.reshape({rows, t.size(-1)}).contiguous();
}

// select() for either activation: GELU goes through at::gelu first, so values and ranking
// are exactly F.gelu's (an erf of our own would differ in the last bit and flip near-ties).
template <class Backend>
void select_activated(const at::Tensor& h, int64_t k, Activation act, at::Tensor& values,
                      at::Tensor& indices, const at::Tensor& pre) {
  if (act == Activation::kRelu) {
    Backend::select(h, k, act, values, indices, pre);
    return;
  }
  Backend::select(at::gelu(h), k, Activation::kIdentity, values, indices, at::Tensor());
  if (pre.defined()) at::gather_out(const_cast<at::Tensor&>(pre), h, 1, indices);
}

inline at::Tensor maybe_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> topk_activation_op(const at::Tensor& h, int64_t k,
                                                      c10::string_view activation) {
  check_topk_activation_inputs(h, k);
  const Activation act = parse_activation(activation);
  const at::Tensor h2 = rows_of(h);
  at::Tensor values = at::empty({h2.size(0), k}, h.options());
  at::Tensor indices = at::empty({h2.size(0), k}, h.options().dtype(at::kLong));
  if (values.numel() > 0) select_activated<Backend>(h2, k, act, values, indices, at::Tensor());
  const auto shape = with_last(h.sizes(), k);
  return {values.view(shape), indices.view(shape)};
}

template <class Backend>
at::Tensor topk_activation_backward_op(const at::Tensor& grad_values, const at::Tensor& h,
                                       const at::Tensor& indices, c10::string_view activation) {
  check_topk_activation_backward_inputs(grad_values, h, indices);
  const Activation act = parse_activation(activation);
  const at::Tensor grad_pre = activation_grad(grad_values, h.gather(-1, indices), act);
  return at::zeros_like(h, at::MemoryFormat::Contiguous).scatter_(-1, indices, grad_pre);
}

template <class Backend>
at::Tensor sparse_down_projection_op(const at::Tensor& values, const at::Tensor& indices,
                                     const at::Tensor& w_down_t,
                                     const std::optional<at::Tensor>& bias) {
  check_sparse_down_projection_inputs(values, indices, w_down_t, bias);
  const auto acc = accumulate_dtype(values.scalar_type());
  const at::Tensor v2 = rows_of(values).to(acc);
  at::Tensor y = at::empty({v2.size(0), w_down_t.size(1)}, values.options());
  if (y.numel() > 0)
    Backend::gather_rows(v2, rows_of(indices), w_down_t.contiguous(), maybe_contiguous(bias), y);
  return y.view(with_last(values.sizes(), w_down_t.size(1)));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_down_projection_backward_op(
    const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& w_down_t, std::array<bool, 3> output_mask) {
  check_sparse_down_projection_backward_inputs(grad_y, values, indices, w_down_t);
  const int64_t d_ff = w_down_t.size(0), d_model = w_down_t.size(1), k = values.size(-1);
  const auto acc = accumulate_dtype(values.scalar_type());
  const at::Tensor g2 = rows_of(grad_y).to(acc), idx = rows_of(indices);
  const auto none = values.new_empty({0});
  at::Tensor grad_values = none, grad_w = none, grad_bias = none;
  if (output_mask[0]) {
    at::Tensor out = at::empty({g2.size(0), k}, g2.options());
    if (out.numel() > 0) Backend::gather_dot(g2, idx, w_down_t.contiguous(), out);
    grad_values = out.to(values.scalar_type()).view(values.sizes());
  }
  if (output_mask[1]) {
    at::Tensor out = at::zeros({d_ff, d_model}, g2.options());
    if (idx.numel() > 0 && d_model > 0)
      Backend::scatter_rows(rows_of(values).to(acc), idx, g2, out);
    grad_w = out.to(values.scalar_type());
  }
  if (output_mask[2]) grad_bias = g2.sum(0).to(values.scalar_type());
  return {grad_values, grad_w, grad_bias};
}

// Returns (y [..., d_model], indices [..., k], h_selected [..., k]): h_selected is the
// pre-activation at the selected neurons, what the backward needs (GELU's derivative).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_mlp_op(
    const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
    const at::Tensor& w_down_t, const std::optional<at::Tensor>& b_down, int64_t k,
    c10::string_view activation) {
  check_topk_mlp_inputs(x, w_up, b_up, w_down_t, b_down, k);
  const Activation act = parse_activation(activation);
  const int64_t d_model = x.size(-1);
  const at::Tensor x2 = rows_of(x);
  const at::Tensor h = Backend::up_projection(x2, w_up, b_up).contiguous();
  const int64_t N = h.size(0);
  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  at::Tensor h_selected = at::empty({N, k}, x.options());
  if (values.numel() > 0) select_activated<Backend>(h, k, act, values, indices, h_selected);
  at::Tensor y = at::empty({N, d_model}, x.options());
  if (y.numel() > 0)
    Backend::gather_rows(values.to(accumulate_dtype(x.scalar_type())), indices,
                         w_down_t.contiguous(), maybe_contiguous(b_down), y);
  const auto shape = with_last(x.sizes(), k);
  return {y.view(x.sizes()), indices.view(shape), h_selected.view(shape)};
}

// Returns (grad_x, grad_w_up, grad_b_up, grad_w_down_t, grad_b_down); an entry whose
// output_mask is false is an empty tensor.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_mlp_backward_op(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_up,
    const at::Tensor& w_down_t, const at::Tensor& h_selected, const at::Tensor& indices,
    c10::string_view activation, std::array<bool, 5> output_mask) {
  check_topk_mlp_backward_inputs(grad_y, x, w_up, w_down_t, h_selected, indices);
  const int64_t k = indices.size(-1);
  const Activation act = parse_activation(activation);
  const int64_t d_ff = w_up.size(0), d_model = x.size(-1);
  const auto dtype = x.scalar_type(), acc = accumulate_dtype(dtype);
  const at::Tensor g2 = rows_of(grad_y).to(acc), idx = rows_of(indices);
  const at::Tensor pre = rows_of(h_selected).to(acc);
  const int64_t N = g2.size(0);
  const bool any_work = idx.numel() > 0 && d_model > 0;
  const auto none = x.new_empty({0});
  at::Tensor gx = none, gw_up = none, gb_up = none, gw_down = none, gb_down = none;

  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    at::Tensor grad_values = at::zeros({N, k}, g2.options());
    if (any_work) Backend::gather_dot(g2, idx, w_down_t.contiguous(), grad_values);
    const at::Tensor grad_pre = activation_grad(grad_values, pre, act).contiguous();
    if (output_mask[0]) {
      gx = at::zeros({N, d_model}, x.options());
      if (any_work) Backend::gather_rows(grad_pre, idx, w_up.contiguous(), at::Tensor(), gx);
      gx = gx.view(x.sizes());
    }
    if (output_mask[1]) {
      at::Tensor out = at::zeros({d_ff, d_model}, g2.options());
      if (any_work) Backend::scatter_rows(grad_pre, idx, rows_of(x).to(acc), out);
      gw_up = out.to(dtype);
    }
    if (output_mask[2])
      gb_up = at::zeros({d_ff}, g2.options()).index_add_(0, idx.view(-1), grad_pre.view(-1)).to(dtype);
  }
  if (output_mask[3]) {
    at::Tensor out = at::zeros({d_ff, d_model}, g2.options());
    if (any_work) Backend::scatter_rows(apply_activation(pre, act).contiguous(), idx, g2, out);
    gw_down = out.to(dtype);
  }
  if (output_mask[4]) gb_down = g2.sum(0).to(dtype);
  return {gx, gw_up, gb_up, gw_down, gb_down};
}

// predicted_sparse_mlp: the MLP on the given neurons only (k rows of w_up and of w_down_t).
// Returns (y [..., d_model], h_selected [..., k] = the pre-activations at the indices); its
// backward is topk_mlp_backward with those indices and h_selected.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> predicted_sparse_mlp_op(
    const at::Tensor& x, const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
    const at::Tensor& w_down_t, const std::optional<at::Tensor>& b_down,
    const at::Tensor& indices, c10::string_view activation) {
  check_predicted_sparse_mlp_inputs(x, w_up, b_up, w_down_t, b_down, indices);
  const Activation act = parse_activation(activation);
  const int64_t d_model = x.size(-1), k = indices.size(-1);
  const at::Tensor x2 = rows_of(x).to(accumulate_dtype(x.scalar_type()));
  const int64_t N = x2.size(0);
  at::Tensor y = at::empty({N, d_model}, x.options());
  at::Tensor h_selected = at::empty({N, k}, x.options());
  if (N > 0)
    Backend::gather_mlp(x2, rows_of(indices), w_up.contiguous(), maybe_contiguous(b_up),
                        w_down_t.contiguous(), maybe_contiguous(b_down), act, h_selected, y);
  return {y.view(x.sizes()), h_selected.view(with_last(x.sizes(), k))};
}

// Registers the seven ops for one backend (dispatch key) with its kernels.
template <class Backend>
void register_topk_mlp_ops(torch::Library& m) {
  m.impl("topk_activation", &topk_activation_op<Backend>);
  m.impl("topk_activation_backward", &topk_activation_backward_op<Backend>);
  m.impl("sparse_down_projection", &sparse_down_projection_op<Backend>);
  m.impl("sparse_down_projection_backward", &sparse_down_projection_backward_op<Backend>);
  m.impl("topk_mlp", &topk_mlp_op<Backend>);
  m.impl("topk_mlp_backward", &topk_mlp_backward_op<Backend>);
  m.impl("predicted_sparse_mlp", &predicted_sparse_mlp_op<Backend>);
}

}  // namespace leanformer
