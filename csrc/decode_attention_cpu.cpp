// decode_attention on the CPU: one decoding step's attention of a layer in one call (RoPE of q
// and k, the cache write, softmax attention over the cache), where PyTorch took ~20 small ops.
//
// A task is (sequence b, KV head g) with its G = H / Hkv query heads: the rotated queries
// (scaled by D^-0.5) in an fp32 tile, each cached key row read once (converted to fp32 once
// for bf16 / fp16) for the G dot products, the scores of all slots kept, then the softmax
// (max-subtracted, vector exp) and O += p V with each value row read once. At SmolLM2-135M's
// decoding sizes (9 heads of 64 over a few hundred keys) a task is a few microseconds: the
// tasks run on the calling thread unless the step's work is large (grain.h), as waking an
// OpenMP worker costs more than that and stalls for milliseconds on a busy host.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "grain.h"
#include "cpu_vec.h"
#include "decode_attention_checks.h"
#include "small_gemm.h"
#include "vector_exp.h"

namespace leanformer {
namespace {

typedef float v16f __attribute__((vector_size(64)));

template <typename scalar_t>
struct DecodeArgs {
  const scalar_t* qkv;
  int64_t qkv_stride;   // between sequences
  int64_t node_stride;  // between a sequence's tree nodes
  scalar_t* k_cache;
  scalar_t* v_cache;
  const int64_t* lens;
  const float* cos;
  const float* sin;
  scalar_t* out;  // [B, T, H * D]
  int64_t H, Hkv, D, L;
  float scale;
  // The token tree of each sequence (decode_attention: one node, the new token): T nodes, node i of
  // sequence b at depth depth[b * T + i] with path[(b * T + i) * T + 0..depth] its nodes from the
  // root down to itself.
  int64_t T;
  const int64_t* depth;
  const int64_t* path;
};

// x rounded to scalar_t and back (what storing it in the input dtype keeps).
template <typename scalar_t>
inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Row src [D] as fp32 into dst [Dp] (zeros from D on), or src itself when it already is fp32
// with whole vectors (Dp == D).
template <typename scalar_t>
__attribute__((always_inline)) inline const float* row_as_float(const scalar_t* src, int64_t D, int64_t Dp,
                                                                float* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (D == Dp) return src;
  }
  int64_t d = 0;
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (; d + 8 <= D; d += 8) {  // cpu_vec.h: 8 fp32 lanes from bf16 / fp16
      const v8f x = vload(src + d);
      std::memcpy(dst + d, &x, sizeof(x));
    }
  }
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  for (; d < Dp; ++d) dst[d] = 0.0f;
  return dst;
}

// The cache lines of a row of D elements (a hint: never faults, also past the cache's end).
constexpr int64_t kAhead = 8;
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * int64_t(sizeof(scalar_t)); off += 64) __builtin_prefetch(p + off);
}

template <typename V>
__attribute__((always_inline)) inline float hsum(V v) {
  constexpr int W = sizeof(V) / sizeof(float);
  float t[W];
  std::memcpy(t, &v, sizeof(v));
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += t[i];
  return s;
}

// Tasks [begin, end) of (b, g), V the vector of fp32 lanes (v16f: AVX-512, v8f: AVX2), for the T
// nodes of sequence b's tree at once (one node, the new token, for decode_attention). Node i, at
// position pos = lens[b] + depth_i, writes its rotated key and its value at cache row lens[b] + i,
// then attends rows 0..lens[b]-1 and the rows of its path (its ancestors and itself, root first):
// n = pos + 1 keys in that order. Each node's dot products, softmax and weighted sum are the
// operations decode_attention performs for the same token with its ancestors at rows lens[b],
// lens[b] + 1, ...: one code for both ops, so a tree's verification computes, bit for bit, what
// plain decoding of the accepted tokens computes (docs/decode_attention.md). Key and value rows of
// the shared prefix are read once for all the nodes.
// buf: T G Dp (queries) + 2 Dp (a key and a value row) + T G np (scores) + T G Dp (outputs) + T G.
template <typename scalar_t, typename V>
__attribute__((always_inline)) inline void decode_tasks(const DecodeArgs<scalar_t>& a, int64_t begin, int64_t end,
                                                        float* buf, int64_t np) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D, G = H / Hkv, half = D / 2, T = a.T, TG = T * G;
  const int64_t Dp = (D + W - 1) / W * W;
  float* q = buf;
  float* krow = q + TG * Dp;
  float* vrow = krow + Dp;
  float* S = vrow + Dp;
  float* O = S + TG * np;
  float* inv = O + TG * Dp;
  const int64_t row_stride = Hkv * D;
  // The scores of query (i, j) against key row k, at S[(i G + j) np + t].
  const auto scores = [&](const float* k, int64_t i, int64_t t) {
    for (int64_t j = 0; j < G; ++j) {
      const float* qj = q + (i * G + j) * Dp;
      V acc0{}, acc1{};
      int64_t d = 0;
      for (; d + 2 * W <= Dp; d += 2 * W) {
        acc0 += vload<V>(qj + d) * vload<V>(k + d);
        acc1 += vload<V>(qj + d + W) * vload<V>(k + d + W);
      }
      if (d < Dp) acc0 += vload<V>(qj + d) * vload<V>(k + d);
      S[(i * G + j) * np + t] = hsum(acc0 + acc1);
    }
  };
  // O[i, j] += p[i, j, t] v.
  const auto accumulate = [&](const float* v, int64_t i, int64_t t) {
    for (int64_t j = 0; j < G; ++j) {
      const V p = vsplat<V>(S[(i * G + j) * np + t]);
      float* Oj = O + (i * G + j) * Dp;
      for (int64_t d = 0; d < Dp; d += W) vstore(Oj + d, vload<V>(Oj + d) + p * vload<V>(v + d));
    }
  };
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / Hkv, g = task % Hkv, len = a.lens[b];
    const int64_t* depth = a.depth + b * T;
    const int64_t* path = a.path + b * T * T;
    const scalar_t* kbase = a.k_cache + (b * a.L * Hkv + g) * D;
    const scalar_t* vbase = a.v_cache + (b * a.L * Hkv + g) * D;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t pos = len + depth[i];
      const scalar_t* row = a.qkv + b * a.qkv_stride + i * a.node_stride;
      const float* c = a.cos + pos * D;
      const float* s = a.sin + pos * D;
      // RoPE in fp32: x * cos + swap_halves(x) * sin (sin's first half negated), rounded to the
      // input dtype as the unfused path stores q and k; q then scaled.
      for (int64_t j = 0; j < G; ++j) {
        const scalar_t* x = row + (g * G + j) * D;
        float* qj = q + (i * G + j) * Dp;
        for (int64_t d = 0; d < D; ++d) {
          const float sw = static_cast<float>(x[d < half ? d + half : d - half]);
          qj[d] = round_to<scalar_t>(static_cast<float>(x[d]) * c[d] + sw * s[d]) * a.scale;
        }
        for (int64_t d = D; d < Dp; ++d) qj[d] = 0.0f;
      }
      const scalar_t* kx = row + (H + g) * D;
      const scalar_t* vx = row + (H + Hkv + g) * D;
      const int64_t slot = ((b * a.L + len + i) * Hkv + g) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float sw = static_cast<float>(kx[d < half ? d + half : d - half]);
        a.k_cache[slot + d] = static_cast<scalar_t>(static_cast<float>(kx[d]) * c[d] + sw * s[d]);
        a.v_cache[slot + d] = vx[d];
      }
    }
    // Scores: the prefix rows once for every node, then each node's path. A decoding step's
    // cache comes from DRAM (the weights streamed since the layer's last step evicted it), its
    // rows row_stride apart: the key and the value row kAhead ahead are prefetched, so the value
    // pass below finds its rows in the cache. (SmolLM2-135M Q4_1, 9 heads x 64, ~100 keys: 48 us
    // a call in a decoding step against 15 us with the cache warm, before.)
    for (int64_t t = 0; t < std::min(len, kAhead); ++t) prefetch_row(kbase + t * row_stride, D);
    for (int64_t t = 0; t < len; ++t) {
      prefetch_row(kbase + (t + kAhead) * row_stride, D);
      prefetch_row(vbase + (t + kAhead) * row_stride, D);
      const float* k = row_as_float(kbase + t * row_stride, D, Dp, krow);
      for (int64_t i = 0; i < T; ++i) scores(k, i, t);
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t e = 0; e <= depth[i]; ++e) scores(row_as_float(kbase + (len + path[i * T + e]) * row_stride, D, Dp,
                                                                  krow), i, len + e);
    // Softmax per query: max, p = exp(score - max) in place (keys n..np-1 give 0), the sum.
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = len + depth[i] + 1;
      for (int64_t j = 0; j < G; ++j) {
        float* Sj = S + (i * G + j) * np;
        for (int64_t t = n; t < np; ++t) Sj[t] = neg_inf;
        V mx = vsplat<V>(neg_inf);
        for (int64_t t = 0; t < np; t += W) mx = vmax(mx, vload<V>(Sj + t));
        float m = neg_inf;
        for (int64_t l = 0; l < W; ++l) m = std::max(m, mx[l]);
        V sum{};
        for (int64_t t = 0; t < np; t += W) {
          const V p = vexp(vload<V>(Sj + t) - vsplat<V>(m));
          vstore(Sj + t, p);
          sum += p;
        }
        inv[i * G + j] = 1.0f / hsum(sum);  // >= 1: the maximum's own term is exp(0)
        std::fill(O + (i * G + j) * Dp, O + (i * G + j + 1) * Dp, 0.0f);
      }
    }
    // O += p V in key order: the prefix rows once for every node, then each node's path.
    for (int64_t t = 0; t < len; ++t) {
      const float* v = row_as_float(vbase + t * row_stride, D, Dp, vrow);
      for (int64_t i = 0; i < T; ++i) accumulate(v, i, t);
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t e = 0; e <= depth[i]; ++e) accumulate(row_as_float(vbase + (len + path[i * T + e]) * row_stride, D,
                                                                      Dp, vrow), i, len + e);
    for (int64_t i = 0; i < T; ++i) {
      scalar_t* o = a.out + (b * T + i) * H * D + g * G * D;
      for (int64_t j = 0; j < G; ++j)
        for (int64_t d = 0; d < D; ++d) o[j * D + d] = static_cast<scalar_t>(O[(i * G + j) * Dp + d] * inv[i * G + j]);
    }
  }
}

// One entry per dtype and ISA (GCC clones no templates): the AVX-512 one with 16-lane vectors,
// the AVX2 / portable clones with 8.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LF_DECODE_AVX512_VEC v16f
#else
#define LF_DECODE_AVX512_VEC v8f  // never called: no AVX-512 here
#endif
#define LF_DECODE_ENTRIES(T)                                                                                   \
  LEANFORMER_AVX512 void decode_tasks_avx512(const DecodeArgs<T>& a, int64_t begin, int64_t end, float* buf,  \
                                             int64_t np) {                                                     \
    decode_tasks<T, LF_DECODE_AVX512_VEC>(a, begin, end, buf, np);                                             \
  }                                                                                                            \
  LEANFORMER_CLONES void decode_tasks_avx2(const DecodeArgs<T>& a, int64_t begin, int64_t end, float* buf,    \
                                           int64_t np) {                                                       \
    decode_tasks<T, v8f>(a, begin, end, buf, np);                                                              \
  }
LF_DECODE_ENTRIES(float)
LF_DECODE_ENTRIES(c10::BFloat16)
LF_DECODE_ENTRIES(c10::Half)
#undef LF_DECODE_ENTRIES

// Runs the tasks of every (sequence, KV head) for trees of T nodes (depth and path as in
// DecodeArgs), writing out [B, T, H * D]; max_key: the longest key list (max lens + depth) + 1.
void run_decode(const at::Tensor& qkv, int64_t node_stride, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const int64_t* lp, const at::Tensor& cos, const at::Tensor& sin, const DecodeAttentionShape& sh,
                int64_t T, const int64_t* depth, const int64_t* path, int64_t max_key, at::Tensor& out) {
  const bool avx512 = cpu_has_avx512();
  const int64_t W = avx512 ? 16 : 8, G = sh.H / sh.Hkv;
  const int64_t Dp = (sh.D + W - 1) / W * W, np = (max_key + W - 1) / W * W;
  const int64_t buf_size = 2 * T * G * Dp + 2 * Dp + T * G * np + T * G;
  // A task: T G scores and T G outputs per key (2 T G D multiply-adds), its K and V rows read.
  const double task_ns = work_ns(2.0 * T * G * max_key * sh.D, 2.0 * max_key * sh.D * qkv.element_size());
  const int64_t grain = parallel_grain(task_ns);
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const DecodeArgs<scalar_t> a{qkv.const_data_ptr<scalar_t>(), qkv.stride(0), node_stride,
                                 k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), lp,
                                 cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), out.data_ptr<scalar_t>(),
                                 sh.H, sh.Hkv, sh.D, sh.L,
                                 static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.D))), T, depth, path};
    parallel_for(0, sh.B * sh.Hkv, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(buf_size);
      if (avx512)
        decode_tasks_avx512(a, begin, end, buf.data(), np);
      else
        decode_tasks_avx2(a, begin, end, buf.data(), np);
    });
  };
  dispatch_decode_attention_dtype(qkv.scalar_type(), run);
}

at::Tensor decode_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lens_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                int64_t num_heads) {
  const DecodeAttentionShape sh =
      check_decode_attention_inputs(qkv_in, k_cache, v_cache, lens_in, cos_in, sin_in, num_heads);
  const at::Tensor qkv = qkv_in.stride(1) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor lens = lens_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    check_decode_len(lp[b], b, sh.L, sh.P);
    max_len = std::max(max_len, lp[b]);
  }
  at::Tensor out = at::empty({sh.B, sh.H * sh.D}, qkv.options());
  if (sh.B == 0) return out;
  const std::vector<int64_t> depth(sh.B, 0), path(sh.B, 0);  // one node: the new token
  run_decode(qkv, 0, k_cache, v_cache, lp, cos, sin, sh, 1, depth.data(), path.data(), max_len + 1, out);
  return out;
}

at::Tensor decode_attention_tree_cpu(const at::Tensor& qkv_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& lens_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                     int64_t num_heads, const at::Tensor& parents_in) {
  const DecodeAttentionShape sh = check_decode_attention_tree_inputs(qkv_in, k_cache, v_cache, lens_in, cos_in,
                                                                     sin_in, num_heads, parents_in)
                                      .concrete();
  const int64_t T = qkv_in.size(1);
  const at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor lens = lens_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  at::Tensor out = at::empty({sh.B, T, sh.H * sh.D}, qkv.options());
  if (sh.B == 0 || T == 0) return out;
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t* pp = parents.const_data_ptr<int64_t>();
  const bool shared = parents.dim() == 1;
  // Depth and root-to-node path of every node (parents checked: -1 at the root, earlier nodes else).
  std::vector<int64_t> depth(sh.B * T), path(sh.B * T * T);
  int64_t max_key = 0;
  for (int64_t b = 0; b < sh.B; ++b) {
    const int64_t* par = pp + (shared ? 0 : b * T);
    for (int64_t i = 0; i < T; ++i) check_parent(par[i], b, i);
    int64_t max_depth = 0;
    for (int64_t i = 0; i < T; ++i) {
      const int64_t d = i == 0 ? 0 : depth[b * T + par[i]] + 1;
      depth[b * T + i] = d;
      int64_t* pi = path.data() + (b * T + i) * T;
      for (int64_t e = d, node = i; e >= 0; --e, node = par[node]) pi[e] = node;
      max_depth = std::max(max_depth, d);
    }
    check_decode_tree_len(lp[b], b, T, max_depth, sh.L, sh.P);
    max_key = std::max(max_key, lp[b] + max_depth + 1);
  }
  run_decode(qkv, qkv.stride(1), k_cache, v_cache, lp, cos, sin, sh, T, depth.data(), path.data(), max_key, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("decode_attention_tree", &decode_attention_tree_cpu);
}

}  // namespace leanformer
