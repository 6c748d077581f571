// Every leanformer op schema lives here, grouped by family; backends register implementations
// in their own files with TORCH_LIBRARY_IMPL. A family's files share its stem:
//   csrc/<family>_checks.h        argument checks every backend calls first (csrc/checks.h: shared)
//   csrc/<family>[_<part>]_cpu.cpp   CPU kernels     csrc/cuda/<family>[_<part>]_cuda.cu  CUDA
//   python/leanformer/ops/<family>.py, reference/<family>.py, tests/ops/test_<family>*.py,
//   bench/bench_<family>.py
// Families: linear_attention (schemas sla_*), rep_batchnorm (rep_batchnorm*, progressive_norm*),
// topk_mlp, nm_sparse_linear, packed_linear (CPU only), quantized_linear, tree_attention, tree_verify, tree_state,
// decode_attention, rms_norm (CPU only).
#include <Python.h>

#include <exception>
#include <string>
#include <torch/library.h>

#include "grain.h"
#include "small_gemm.h"
#include "split_pool.h"

// An importable Python module, so `import leanformer._C` loads the schemas and kernels without
// pulling pybind11 into every translation unit. Its functions name the vector tiles the CPU
// kernels run with here (the ISA is picked at load time, so users and tests can see it) and
// count the chunks the CPU kernels ran inside parallel regions (tests check that
// decoding-sized calls open none, grain.h) and the work of split_run's helpers (split_pool.h).
extern "C" {
static PyObject* cpu_vector_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(leanformer::cpu_vector_isa());
}

static PyObject* parallel_chunks(PyObject*, PyObject*) {
  return PyLong_FromLongLong(leanformer::parallel_chunk_count().load());
}

static PyObject* split_stats(PyObject*, PyObject*) {
  const leanformer::SplitStats s = leanformer::split_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:i}", "jobs", (long long)s.jobs, "helper_chunks", (long long)s.helper_chunks,
                       "taken_back", (long long)s.taken_back, "helpers", leanformer::split_helpers());
}

static PyObject* split_selftest(PyObject*, PyObject* args) {
  long long chunks, chunk_us, delay_us, throw_at = -1;
  if (!PyArg_ParseTuple(args, "LLL|L", &chunks, &chunk_us, &delay_us, &throw_at)) return nullptr;
  if (chunks < 1 || chunks > 100000 || chunk_us < 0 || delay_us < 0) {
    PyErr_SetString(PyExc_ValueError, "split_selftest: chunks must be in 1..100000, chunk_us and delay_us >= 0");
    return nullptr;
  }
  double seconds = 0;
  bool ok = false;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    ok = leanformer::split_selftest(chunks, chunk_us, delay_us, &seconds, throw_at);
  } catch (const std::exception& e) {
    error = e.what();
  }
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return Py_BuildValue("(Od)", ok ? Py_True : Py_False, seconds);
}

PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_vector_isa", cpu_vector_isa, METH_NOARGS,
       "'avx512', 'avx2' or 'portable': the vector tiles leanformer's CPU kernels use here."},
      {"parallel_chunks", parallel_chunks, METH_NOARGS,
       "The chunks of work leanformer's CPU kernels ran inside a parallel region since loading."},
      {"split_stats", split_stats, METH_NOARGS,
       "split_run's counters since loading (jobs, chunks its helpers delivered, chunks the caller took "
       "back from a late helper) and the helpers a call would use now (csrc/split_pool.h)."},
      {"split_selftest", split_selftest, METH_VARARGS,
       "split_selftest(chunks, chunk_us, delay_us, throw_at=-1) -> (outputs right, seconds): a job of chunks of "
       "chunk_us whose helpers sleep delay_us more in each, a descheduled helper's stand-in, and whose chunk "
       "throw_at raises on the caller (tests)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(leanformer, m) {
  // ---- linear_attention ----
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

  // ---- rep_batchnorm ----
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

  // ---- topk_mlp ----
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

  // ---- nm_sparse_linear ----
  // N:M sparse linear (DSFormer's sparse factor; see python/leanformer/sparse/nm_format.py for
  // the packed layout). S [rows, K] is N:M sparse along K: values [rows, K/m*n] (the n kept
  // entries of each group of m columns, ascending column order), meta int32 [rows, W] with the
  // in-group column of every value, ceil(log2 m) rounded up to a power of two bits each, LSB
  // first, never straddling a word. y [..., rows] = x [..., K] @ S^T + bias.
  m.def("nm_sparse_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, *, int n, int m) "
        "-> Tensor");
  // Returns (grad_x [..., K], grad_values [rows, K/m*n]: the gradient w.r.t. the kept values
  // under the fixed pattern); the ones output_mask leaves out are empty. grad_bias is a sum
  // over grad_y and is left to the caller.
  m.def(
      "nm_sparse_linear_backward(Tensor grad_y, Tensor x, Tensor values, Tensor meta, *, int n, "
      "int m, bool[2] output_mask) -> (Tensor, Tensor)");

  // ---- packed_linear ----
  // Linear for the few rows of a decoding step: y [..., N] = x [..., K] @ W^T + bias, with W
  // [N, K] prepacked as packed_weight [ceil(N/32), K, 32] (panel p, row k, lane j holds
  // W[32p + j, k], zero past N; python/leanformer/ops/packed_linear.py packs it).
  m.def("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features) -> Tensor");
  // y [..., hidden] = silu(x @ Wg^T) * (x @ Wu^T) (Llama's SwiGLU before its down projection),
  // gate and up [hidden, K] packed side by side per panel: packed_gate_up [ceil(hidden/32), 2, K, 32].
  m.def("packed_swiglu(Tensor x, Tensor packed_gate_up, int hidden) -> Tensor");

  // ---- quantized_linear ----
  // y [..., N] = x [..., K] @ W^T + bias with W block-quantized: blocks of 32 inputs, 4- or 8-bit
  // unsigned codes u, float16 scale s and minimum m per output and block, W = s u + m (m =
  // -2^(bits-1) s where mins is absent: GGUF's Q4_0 / Q8_0; Q4_1 stores m). Packed in tiles of 16
  // outputs: qweight uint8 [ceil(N/16), K/32, 16 * 32 * bits / 8], scales / mins float16
  // [ceil(N/16), K/32, 16] (python/leanformer/reference/quantized_linear.py). x is rounded to int8
  // per row and block (llama.cpp's Q8_0 activations) and the products summed in integers.
  m.def("quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, Tensor? bias, int bits, "
        "int out_features) -> Tensor");

  // ---- rms_norm ----
  // y [..., C] = x / sqrt(mean(x^2 over C) + eps) * weight, x [..., C] float32, float16, bfloat16
  // or float64, weight [C] in x's dtype or float32, in fp32 (fp64 for fp64) with a fixed
  // summation order (16 lane sums, then a fixed tree): every CPU path gives the same bits, and a
  // row's result does not depend on the other rows. CPU only (CUDA users keep F.rms_norm).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");

  // ---- tree_attention ----
  // Tree-verified decoding. Softmax attention of a token tree's queries q [B, T, Hq, D] over each
  // sequence's cached prefix k_cache/v_cache [B, L_max, Hkv, D|Dv] (the first cache_lens[b]
  // slots, int64 [B], unmasked) and over the tree k_tree/v_tree [B, T, Hkv, D|Dv] where
  // tree_mask (bool [T, T] shared or [B, T, T]; [i, j] true iff j is i or an ancestor of i)
  // allows; the two parts are merged by log-sum-exp. Hq % Hkv == 0 (GQA). scale defaults to
  // D^-0.5. Returns o [B, T, Hq, Dv].
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor k_tree, "
      "Tensor v_tree, Tensor tree_mask, float? scale) -> Tensor");
  // The same for simplified linear attention: node i sees the prefix state (S [B, H, Dk, Dv],
  // z [B, H, Dk], fp32) plus the ReLU features of itself and its ancestors:
  // o_i = phi(q_i) (S + sum_j phi(k_j)^T v_j) / (phi(q_i) . (z + sum_j phi(k_j)) + eps).
  m.def(
      "tree_linear_attention(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, Tensor tree_mask, "
      "float eps) -> Tensor");

  // ---- tree_verify ----
  // Greedy verification. logits [B, T, V] of the tree nodes, tree_tokens [B, T] int64 (node 0
  // is the root, the last verified token), parents [T] or [B, T] int64 (parents[0] = -1,
  // parents[i] < i). Returns (accepted [B, T] int64 node indices along the accepted path,
  // accepted[:, 0] = 0, padded with -1; num_accepted [B] int64 >= 1; bonus [B] int64).
  m.def("verify_tree_greedy(Tensor logits, Tensor tree_tokens, Tensor parents) "
        "-> (Tensor, Tensor, Tensor)");
  // Lossless sampling verification (KERNELS.md section 4) on probs [B, T, V], already warped
  // (temperature, top-k, top-p) exactly as plain sampling warps them; uniforms [B, U] fp32 in
  // [0, 1) drawn by the caller from its generator, consumed in a fixed order. Same outputs.
  m.def("verify_tree_sampling(Tensor probs, Tensor tree_tokens, Tensor parents, Tensor uniforms) "
        "-> (Tensor, Tensor, Tensor)");
  // In place, per sequence: the tree's K/V were appended at slots cache_lens[b] + i; keep the
  // accepted nodes (slot L + accepted[b, j] -> L + j, j < num_accepted[b]) and set
  // cache_lens[b] += num_accepted[b].
  m.def(
      "compact_kv_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) cache_lens, "
      "Tensor accepted, Tensor num_accepted) -> ()");

  // ---- tree_state ----
  // In place, for a SLAB LM after a tree verification, every layer at once: S[l] += sum_j
  // relu(k[l][b, path[b, j]])^T v[l][b, path[b, j]] and z[l] += the relu(k) rows, j <
  // num_accepted[b]; conv_tail[l] [B*H, Dv, W] becomes the last W values of "old tail ++ the
  // path's V" (oldest first). The state plain decoding of the path's tokens would have left.
  m.def(
      "sla_tree_commit(Tensor(a!)[] S, Tensor(b!)[] z, Tensor(c!)[] conv_tail, Tensor[] k, Tensor[] v, "
      "Tensor path, Tensor num_accepted) -> ()");
  // SLAB's causal depthwise conv of V for each tree node along its ancestor chain, continued
  // into the prefix's conv tail: v [B, T, H, D], conv_tail [B*H, D, W] (oldest first), parents
  // int64 [T] or [B, T], weight [D, W + 1] (Conv1d taps, shared by the heads), bias [D]:
  // out[b, t, h, d] = bias[d] + sum_l weight[d, W - l] * (the value l steps up t's chain).
  m.def("tree_dwconv(Tensor v, Tensor conv_tail, Tensor parents, Tensor weight, Tensor? bias) -> Tensor");

  // ---- decode_attention ----
  // One new token per sequence over a KV cache: qkv [B, (H + 2 Hkv) * D] (q, k, v side by side),
  // q and k rotated (rotate-half RoPE, fp32, with row lens[b] of cos / sin [P, D] float32), k and v
  // written in place at k_cache / v_cache [B, L, Hkv, D] row lens[b] (lens itself unchanged), then
  // each query head h attends over slots 0..lens[b] of KV head h / (H / Hkv), scale D^-0.5
  // -> [B, H * D] in qkv's dtype.
  m.def(
      "decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lens, Tensor cos, "
      "Tensor sin, int num_heads) -> Tensor");
  // The same for a token tree of T nodes per sequence (CPU): qkv [B, T, (H + 2 Hkv) * D], parents int64
  // [T] or [B, T] (parents[0] = -1, parents[i] < i). Node i is the token at position lens[b] +
  // depth(i); its rotated key and value go to cache row lens[b] + i; it attends rows 0..lens[b]-1,
  // then its ancestors' rows and its own, root first -> [B, T, H * D]. Bit for bit what
  // decode_attention computes for that token once its ancestors sit at rows lens[b], lens[b] + 1, ...
  m.def(
      "decode_attention_tree(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor lens, Tensor cos, "
      "Tensor sin, int num_heads, Tensor parents) -> Tensor");
}
