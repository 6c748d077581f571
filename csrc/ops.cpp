// Every leanformer op schema lives here; backends register implementations in their
// own files (csrc/*_cpu.cpp, csrc/cuda/*.cu) with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// An importable (empty) Python module, so `import leanformer._C` loads the schemas and
// kernels without pulling pybind11 into every translation unit.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(leanformer, m) {
  // Simplified linear attention (SLAB). q, k [B, T, H, Dk]; v [B, T, H, Dv]; ReLU feature map
  // inside. Returns (o [B, T, H, Dv], S [B, H, Dk, Dv], z [B, H, Dk]) with the final state.
  m.def(
      "sla_forward(Tensor q, Tensor k, Tensor v, Tensor? initial_S, Tensor? initial_z, "
      "bool causal, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_initial_S, grad_initial_z).
  m.def(
      "sla_backward(Tensor grad_o, Tensor? grad_S, Tensor? grad_z, Tensor q, Tensor k, "
      "Tensor v, Tensor o, Tensor? initial_S, Tensor? initial_z, bool causal, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One recurrent decode step: q, k [B, H, Dk]; v [B, H, Dv]; state (S, z).
  // Returns (o [B, H, Dv], S_new, z_new). Its backward is sla_backward with T = 1.
  m.def("sla_step(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, float eps) "
        "-> (Tensor, Tensor, Tensor)");

  // RepBN (SLAB): BatchNorm over every token of x [..., C] per channel, plus alpha * x.
  // Training normalizes with the batch statistics of the tokens where mask is true (all when
  // mask is None); eval with the running ones. Functional: returns (y, mean, invstd) and the
  // caller folds mean and the variance into its running buffers.
  m.def(
      "rep_batchnorm(Tensor x, Tensor weight, Tensor bias, Tensor alpha, Tensor running_mean, "
      "Tensor running_var, bool training, float eps, Tensor? mask) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_alpha).
  m.def(
      "rep_batchnorm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor alpha, Tensor mean, "
      "Tensor invstd, bool training, Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // PRepBN: gamma * LayerNorm(x) + (1 - gamma) * RepBN(x) in one pass over x (after the
  // statistics pass in training). Returns (y, bn_mean, bn_invstd).
  m.def(
      "progressive_norm(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor bn_weight, "
      "Tensor bn_bias, Tensor alpha, Tensor running_mean, Tensor running_var, float gamma, "
      "bool training, float ln_eps, float bn_eps, Tensor? mask) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_ln_weight, grad_ln_bias, grad_bn_weight, grad_bn_bias, grad_alpha).
  m.def(
      "progressive_norm_backward(Tensor grad_y, Tensor x, Tensor ln_weight, Tensor bn_weight, "
      "Tensor alpha, Tensor bn_mean, Tensor bn_invstd, float gamma, bool training, "
      "float ln_eps, Tensor? mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Data-parallel (synchronized) statistics, as SyncBatchNorm splits its kernels. The forward
  // all-reduces rep_batchnorm_stats (fp64 [2C + 1]: sum x, sum x^2 over the tokens where mask
  // is true, count) and runs rep_batchnorm / progressive_norm in eval mode with the global
  // mean and biased variance. The backward: progressive_norm_backward_reduce gives the fp64
  // column sums [4, C] over every token (dy, dy * xhat_bn, dy * x, dy * xhat_ln; the parameter
  // gradients are these scaled by 1 - gamma or gamma), the first two are all-reduced and
  // divided by the global count, and progressive_norm_backward_elemt writes grad_x with them.
  // RepBN is gamma = 0 (ln_weight may then be None).
  m.def("rep_batchnorm_stats(Tensor x, Tensor? mask) -> Tensor");
  m.def(
      "progressive_norm_backward_reduce(Tensor grad_y, Tensor x, Tensor bn_mean, "
      "Tensor bn_invstd, float gamma, float ln_eps) -> Tensor");
  m.def(
      "progressive_norm_backward_elemt(Tensor grad_y, Tensor x, Tensor? ln_weight, "
      "Tensor bn_weight, Tensor alpha, Tensor bn_mean, Tensor bn_invstd, Tensor mean_dy, "
      "Tensor mean_dy_xhat, float gamma, float ln_eps, Tensor? mask) -> Tensor");
  // Top-k sparse MLP activation (Lazy Neuron). Per row of h [..., d_ff]: the k largest
  // act(h) (act = "relu" or "gelu"; ties -> lowest index) as (values [..., k] in h's dtype,
  // indices [..., k] int64 ascending).
  m.def("topk_activation(Tensor h, int k, str activation) -> (Tensor, Tensor)");
  // grad_h [..., d_ff]: grad_values * act'(h) at the selected entries, zero elsewhere.
  m.def("topk_activation_backward(Tensor grad_values, Tensor h, Tensor indices, str activation) "
        "-> Tensor");
  // y [..., d_model] = bias + sum_j values[..., j] * w_down_t[indices[..., j]];
  // w_down_t [d_ff, d_model]. Only the selected rows of w_down_t are read.
  m.def("sparse_down_projection(Tensor values, Tensor indices, Tensor w_down_t, Tensor? bias) "
        "-> Tensor");
  // Returns (grad_values, grad_w_down_t, grad_bias); the ones output_mask leaves out are empty.
  m.def(
      "sparse_down_projection_backward(Tensor grad_y, Tensor values, Tensor indices, "
      "Tensor w_down_t, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The whole MLP: h = x w_up^T + b_up (dense GEMM), top-k of act(h), sparse down projection.
  // w_up [d_ff, d_model] (nn.Linear layout), w_down_t [d_ff, d_model] (transposed).
  // Returns (y [..., d_model], indices [..., k], h_selected [..., k] = h at the indices).
  m.def(
      "topk_mlp(Tensor x, Tensor w_up, Tensor? b_up, Tensor w_down_t, Tensor? b_down, int k, "
      "str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_w_up, grad_b_up, grad_w_down_t, grad_b_down); gradients flow
  // through the selected neurons only. Entries output_mask leaves out are empty.
  m.def(
      "topk_mlp_backward(Tensor grad_y, Tensor x, Tensor w_up, Tensor w_down_t, "
      "Tensor h_selected, Tensor indices, str activation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The MLP on predicted neurons (Deja Vu): indices [..., k] int64 per row of x, e.g. the
  // top-k of an active-neuron predictor. y = b_down + sum_j act(x . w_up[idx_j] + b_up[idx_j])
  // * w_down_t[idx_j]; only those k rows of w_up and w_down_t are read. Returns (y [..., d_model],
  // h_selected [..., k] = the pre-activations at the indices); the backward is topk_mlp_backward.
  m.def(
      "predicted_sparse_mlp(Tensor x, Tensor w_up, Tensor? b_up, Tensor w_down_t, Tensor? b_down, "
      "Tensor indices, str activation) -> (Tensor, Tensor)");
}
