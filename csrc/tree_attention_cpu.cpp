// Tree attention on the CPU (flash-decoding over the prefix, then the masked tree).
//
// A task is (sequence b, KV head g, block of tree nodes). All G = Hq / Hkv query heads of g
// and all the block's nodes are the columns of one transposed query tile Qt [D, nq], so each
// prefix K/V row is read once per block: scores come as St [keys, nq] = K_chunk Qt (K read in
// place from the cache for fp32), the online softmax runs down the columns with 16 (AVX-512) or
// 8 queries per vector, and O [nq, Dv] += P^T V_chunk. The tree keys are one more chunk with the ancestor
// mask applied, which is the log-sum-exp merge of the two parts done incrementally.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "grain.h"
#include "small_gemm.h"
#include "tree_attention_checks.h"
#include "vector_exp.h"

namespace leanformer {
namespace {

constexpr int64_t kKeyChunk = 128;
// Query columns per task: the score, query and output tiles (128 keys x 128 columns, 64 x 128,
// 128 x 64 floats: 128 KiB) stay in L2 next to the K/V chunk. GQA's G query heads of a node
// share the columns, so at G = 4 a 64-node tree is two tasks per KV head (each rereading the
// head's prefix): on a 2-core AVX-512 Xeon 2.2-2.3 ms against 2.5 ms with 256 columns.
constexpr int64_t kMaxQueryColumns = 128;

// O's rows times the online softmax's correction of their column (skipped where it is 1).
inline void rescale_rows(float* O, int64_t nq, int64_t ldo, const float* corr) {
  for (int64_t i = 0; i < nq; ++i)
    if (corr[i] != 1.0f)
      for (int64_t d = 0; d < ldo; ++d) O[i * ldo + d] *= corr[i];
}

// Online softmax over one chunk: St [n, ld] scores (-inf = masked) become the unnormalized
// probabilities, and the running (m, l) and the output rows O [nq, ldo] are rescaled; V is a
// vector of floats, one vector of query columns at a time (ld is a multiple of its width).
template <typename V>
__attribute__((always_inline)) inline void softmax_chunk_impl(float* St, int64_t n, int64_t ld, float* m,
                                                              float* l, float* O, int64_t nq, int64_t ldo,
                                                              float* corr, const float* chunk_max) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < ld; c += W) {
    // Four running maxima: one would chain every row on vmax's latency (a fifth of the
    // kernel at prefix 2048 / tree 64 on AVX-512); max is exact in any order.
    V mx0 = vsplat<V>(neg_inf), mx1 = mx0, mx2 = mx0, mx3 = mx0;
    int64_t r = chunk_max ? n : 0;
    if (chunk_max) mx0 = vload<V>(chunk_max + c);
    for (; r + 4 <= n; r += 4) {
      mx0 = vmax(mx0, vload<V>(St + r * ld + c));
      mx1 = vmax(mx1, vload<V>(St + (r + 1) * ld + c));
      mx2 = vmax(mx2, vload<V>(St + (r + 2) * ld + c));
      mx3 = vmax(mx3, vload<V>(St + (r + 3) * ld + c));
    }
    for (; r < n; ++r) mx0 = vmax(mx0, vload<V>(St + r * ld + c));
    const V mx = vmax(vmax(mx0, mx1), vmax(mx2, mx3));
    const V m_old = vload<V>(m + c);
    const V m_new = vmax(m_old, mx);
    // A column that saw only masked keys keeps m = -inf; subtracting 0 keeps its p at 0.
    const V shift = m_new == vsplat<V>(neg_inf) ? V{} : m_new;
    V sum0{}, sum1{};
    for (r = 0; r + 2 <= n; r += 2) {
      const V p0 = vexp(vload<V>(St + r * ld + c) - shift);
      const V p1 = vexp(vload<V>(St + (r + 1) * ld + c) - shift);
      vstore(St + r * ld + c, p0);
      vstore(St + (r + 1) * ld + c, p1);
      sum0 += p0;
      sum1 += p1;
    }
    if (r < n) {
      const V p = vexp(vload<V>(St + r * ld + c) - shift);
      vstore(St + r * ld + c, p);
      sum0 += p;
    }
    const V sum = sum0 + sum1;
    const V scale = vexp(m_old - shift);
    vstore(corr + c, scale);
    vstore(l + c, vload<V>(l + c) * scale + sum);
    vstore(m + c, m_new);
  }
  rescale_rows(O, nq, ldo, corr);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The AVX-512 softmax: the template's loop with vexp512 (GCC will not inline its intrinsics
// into the template), about 7% faster at prefix 2048 / tree 64 with GQA.
LEANFORMER_AVX512 void softmax_chunk_avx512(float* St, int64_t n, int64_t ld, float* m, float* l, float* O,
                                            int64_t nq, int64_t ldo, float* corr, const float* chunk_max) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < ld; c += 16) {
    float* col = St + c;
    __m512 mx0 = chunk_max ? _mm512_loadu_ps(chunk_max + c) : neg_inf, mx1 = neg_inf, mx2 = neg_inf, mx3 = neg_inf;
    int64_t r = chunk_max ? n : 0;  // the GEMM took the chunk's maximum already
    for (; r + 4 <= n; r += 4) {
      mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(col + r * ld));
      mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(col + (r + 1) * ld));
      mx2 = _mm512_max_ps(mx2, _mm512_loadu_ps(col + (r + 2) * ld));
      mx3 = _mm512_max_ps(mx3, _mm512_loadu_ps(col + (r + 3) * ld));
    }
    for (; r < n; ++r) mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(col + r * ld));
    const __m512 m_old = _mm512_loadu_ps(m + c);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_max_ps(_mm512_max_ps(mx0, mx1), _mm512_max_ps(mx2, mx3)));
    // all keys masked so far: m stays -inf and the shift is 0, so p stays 0
    const __m512 shift = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ), m_new);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    for (r = 0; r + 2 <= n; r += 2) {
      const __m512 p0 = vexp512(_mm512_sub_ps(_mm512_loadu_ps(col + r * ld), shift));
      const __m512 p1 = vexp512(_mm512_sub_ps(_mm512_loadu_ps(col + (r + 1) * ld), shift));
      _mm512_storeu_ps(col + r * ld, p0);
      _mm512_storeu_ps(col + (r + 1) * ld, p1);
      sum0 = _mm512_add_ps(sum0, p0);
      sum1 = _mm512_add_ps(sum1, p1);
    }
    if (r < n) {
      const __m512 p = vexp512(_mm512_sub_ps(_mm512_loadu_ps(col + r * ld), shift));
      _mm512_storeu_ps(col + r * ld, p);
      sum0 = _mm512_add_ps(sum0, p);
    }
    const __m512 scale = vexp512(_mm512_sub_ps(m_old, shift));
    _mm512_storeu_ps(corr + c, scale);
    _mm512_storeu_ps(l + c, _mm512_fmadd_ps(_mm512_loadu_ps(l + c), scale, _mm512_add_ps(sum0, sum1)));
    _mm512_storeu_ps(m + c, m_new);
  }
  rescale_rows(O, nq, ldo, corr);
}
#else
void softmax_chunk_avx512(float* St, int64_t n, int64_t ld, float* m, float* l, float* O, int64_t nq,
                          int64_t ldo, float* corr, const float* chunk_max) {
  softmax_chunk_impl<v8f>(St, n, ld, m, l, O, nq, ldo, corr, chunk_max);  // never called: no AVX-512 here
}
#endif

LEANFORMER_CLONES void softmax_chunk_avx2(float* St, int64_t n, int64_t ld, float* m, float* l, float* O,
                                          int64_t nq, int64_t ldo, float* corr, const float* chunk_max) {
  softmax_chunk_impl<v8f>(St, n, ld, m, l, O, nq, ldo, corr, chunk_max);
}

// chunk_max: the column maxima of St when the GEMM took them (gemm_colmax), else nullptr.
void softmax_chunk(float* St, int64_t n, int64_t ld, float* m, float* l, float* O, int64_t nq, int64_t ldo,
                   float* corr, const float* chunk_max) {
  static_assert(kGemmColBlock % 16 == 0, "query columns are padded to whole 512-bit vectors");
  if (cpu_has_avx512())
    softmax_chunk_avx512(St, n, ld, m, l, O, nq, ldo, corr, chunk_max);
  else
    softmax_chunk_avx2(St, n, ld, m, l, O, nq, ldo, corr, chunk_max);
}

void softmax_chunk(double* St, int64_t n, int64_t ld, double* m, double* l, double* O, int64_t nq,
                   int64_t ldo, double* corr, const double*) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < ld; ++c) {
    double mx = neg_inf;
    for (int64_t r = 0; r < n; ++r) mx = std::max(mx, St[r * ld + c]);
    const double m_new = std::max(m[c], mx), shift = m_new == neg_inf ? 0.0 : m_new;
    double sum = 0;
    for (int64_t r = 0; r < n; ++r) sum += (St[r * ld + c] = std::exp(St[r * ld + c] - shift));
    corr[c] = std::exp(m[c] - shift);
    l[c] = l[c] * corr[c] + sum;
    m[c] = m_new;
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < ldo; ++d) O[i * ldo + d] *= corr[i];
}

// Rows of one head of a [B, L, H, D] tensor (last dim contiguous).
template <typename T>
struct HeadRows {
  const T* ptr;
  int64_t stride;  // between rows (tokens)
  const T* row(int64_t i) const { return ptr + i * stride; }
};

template <typename T>
HeadRows<T> head_rows(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.const_data_ptr<T>() + b * x.stride(0) + h * x.stride(2), x.stride(1)};
}

// Rows [r0, r0 + n) of a head as an acc_t tile [n, ld] (columns from D on zeroed), or the
// rows in place when they already are acc_t with ld columns readable.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_tile(const HeadRows<scalar_t>& x, int64_t r0, int64_t n, int64_t D,
                          int64_t ld, std::vector<acc_t>& buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (D == ld) {
      ld_out = x.stride;
      return x.row(r0);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = x.row(r0 + i);
    acc_t* dst = buf.data() + i * ld;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
    std::fill(dst + D, dst + ld, acc_t(0));
  }
  ld_out = ld;
  return buf.data();
}

struct Block {
  int64_t b, g, t0, t1;
};

template <typename scalar_t, typename acc_t>
void attend_block(const Block& blk, const TreeAttentionShape& s, acc_t scale, int64_t prefix_len,
                  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& k_tree, const at::Tensor& v_tree, const bool* mask,
                  int64_t mask_stride_t, at::Tensor& out) {
  const int64_t G = s.Hq / s.Hkv, nq = (blk.t1 - blk.t0) * G;
  const int64_t nqp = round_up(nq, kGemmColBlock), Dvp = round_up(std::max<int64_t>(s.Dv, 1), kGemmColBlock);
  // Query column c = (t - t0) * G + j is node t, head g * G + j (q's own memory order).
  std::vector<acc_t> Qt(s.D * nqp, acc_t(0)), St(kKeyChunk * nqp), O(nq * Dvp, acc_t(0));
  std::vector<acc_t> m(nqp, -std::numeric_limits<acc_t>::infinity()), l(nqp, acc_t(0)), corr(nqp), chunk_max(nqp);
  std::vector<acc_t> k_buf(kKeyChunk * s.D), v_buf(kKeyChunk * Dvp);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>() + blk.b * q.stride(0);
  for (int64_t t = blk.t0; t < blk.t1; ++t)
    for (int64_t j = 0; j < G; ++j) {
      const scalar_t* row = q_ptr + t * q.stride(1) + (blk.g * G + j) * q.stride(2);
      const int64_t c = (t - blk.t0) * G + j;
      for (int64_t d = 0; d < s.D; ++d) Qt[d * nqp + c] = static_cast<acc_t>(row[d]) * scale;
    }

  auto chunk = [&](const HeadRows<scalar_t>& K, const HeadRows<scalar_t>& V, int64_t r0, int64_t n,
                   const bool* tree_mask_rows) {
    int64_t ldk, ldv;
    const acc_t* Kc = rows_as_tile<scalar_t, acc_t>(K, r0, n, s.D, s.D, k_buf, ldk);
    const acc_t* Vc = rows_as_tile<scalar_t, acc_t>(V, r0, n, s.Dv, Dvp, v_buf, ldv);
    // fp32 prefix chunks: the GEMM also takes each column's maximum (no mask to apply after)
    acc_t* fused_max = nullptr;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!tree_mask_rows) {
        std::fill(chunk_max.begin(), chunk_max.end(), -std::numeric_limits<float>::infinity());
        gemm_colmax(n, nqp, s.D, Kc, ldk, Qt.data(), nqp, St.data(), nqp, chunk_max.data());
        fused_max = chunk_max.data();
      }
    }
    if (!fused_max) gemm(false, n, nqp, s.D, Kc, ldk, Qt.data(), nqp, St.data(), nqp, false);
    if (tree_mask_rows) {  // key r0 + r is tree node r0 + r; column c is node t0 + c / G
      const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < nq; ++c)
          if (!tree_mask_rows[(blk.t0 + c / G) * mask_stride_t + r0 + r]) St[r * nqp + c] = neg_inf;
    }
    softmax_chunk(St.data(), n, nqp, m.data(), l.data(), O.data(), nq, Dvp, corr.data(), fused_max);
    gemm(true, nq, Dvp, n, St.data(), nqp, Vc, ldv, O.data(), Dvp, true);
  };

  const auto Kp = head_rows<scalar_t>(k_cache, blk.b, blk.g), Vp = head_rows<scalar_t>(v_cache, blk.b, blk.g);
  for (int64_t r0 = 0; r0 < prefix_len; r0 += kKeyChunk)
    chunk(Kp, Vp, r0, std::min(kKeyChunk, prefix_len - r0), nullptr);
  const auto Kt = head_rows<scalar_t>(k_tree, blk.b, blk.g), Vt = head_rows<scalar_t>(v_tree, blk.b, blk.g);
  for (int64_t r0 = 0; r0 < s.T; r0 += kKeyChunk) chunk(Kt, Vt, r0, std::min(kKeyChunk, s.T - r0), mask);

  scalar_t* o_ptr = out.data_ptr<scalar_t>() + blk.b * out.stride(0);
  for (int64_t c = 0; c < nq; ++c) {
    const int64_t t = blk.t0 + c / G, h = blk.g * G + c % G;
    scalar_t* dst = o_ptr + t * out.stride(1) + h * out.stride(2);
    const acc_t inv = acc_t(1) / l[c];  // l > 0: every node sees itself (checked)
    for (int64_t d = 0; d < s.Dv; ++d) dst[d] = static_cast<scalar_t>(O[c * Dvp + d] * inv);
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

at::Tensor tree_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                              const at::Tensor& v_cache_in, const at::Tensor& cache_lens_in,
                              const at::Tensor& k_tree_in, const at::Tensor& v_tree_in,
                              const at::Tensor& tree_mask_in, std::optional<double> scale) {
  const TreeAttentionShape s = check_tree_attention_inputs(q_in, k_cache_in, v_cache_in, cache_lens_in,
                                                           k_tree_in, v_tree_in, tree_mask_in);
  const at::Tensor q = last_dim_contiguous(q_in), k_cache = last_dim_contiguous(k_cache_in),
                   v_cache = last_dim_contiguous(v_cache_in), k_tree = last_dim_contiguous(k_tree_in),
                   v_tree = last_dim_contiguous(v_tree_in);
  const at::Tensor cache_lens = cache_lens_in.contiguous(), tree_mask = tree_mask_in.contiguous();
  const int64_t* lens = cache_lens.const_data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    check_cache_len(lens[b], b, s.L_max);
    max_len = std::max(max_len, lens[b]);
  }
  const bool shared_mask = tree_mask.dim() == 2;
  const bool* mask = tree_mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < (shared_mask ? 1 : s.B); ++b)
    for (int64_t i = 0; i < s.T; ++i) check_tree_mask_diagonal(mask[(b * s.T + i) * s.T + i], b, i);

  at::Tensor out = at::empty({s.B, s.T, s.Hq, s.Dv}, q.options());
  if (out.numel() == 0) return out;
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  const int64_t G = s.Hq / s.Hkv;
  // Enough blocks of tree nodes to occupy every thread (where the work is worth a parallel
  // region), and few enough query columns per block for the tiles to stay in cache; each block
  // reads its head's prefix once. A query column costs (keys) (D + Dv) multiply-adds.
  const double column_ns = work_ns(double(max_len + s.T) * (s.D + s.Dv), 0);
  const int64_t threads = planned_threads(column_ns * s.B * s.T * s.Hq);
  int64_t blocks = std::max<int64_t>((threads + s.B * s.Hkv - 1) / (s.B * s.Hkv),
                                     (s.T * G + kMaxQueryColumns - 1) / kMaxQueryColumns);
  blocks = std::min(blocks, s.T);
  const int64_t per_block = (s.T + blocks - 1) / blocks;
  blocks = (s.T + per_block - 1) / per_block;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "tree_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const double prefix_ns = work_ns(0, double(max_len) * (s.D + s.Dv) * q.element_size());
    const int64_t grain = parallel_grain(column_ns * per_block * G + prefix_ns);
    parallel_for(0, s.B * s.Hkv * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (s.Hkv * blocks), g = task / blocks % s.Hkv, blk = task % blocks;
        const Block block{b, g, blk * per_block, std::min(s.T, (blk + 1) * per_block)};
        attend_block<scalar_t, acc_t>(block, s, static_cast<acc_t>(sc), lens[b], q, k_cache, v_cache,
                                      k_tree, v_tree, mask + (shared_mask ? 0 : b * s.T * s.T), s.T,
                                      out);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace leanformer
