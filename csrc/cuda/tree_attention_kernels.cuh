// The kernels of tree attention and tree linear attention, torch-free (pointers, sizes and
// strides in); the launchers are in tree_attention_cuda.cu. Compiled by nvcc for the GPU and, in
// the emulation build, for the CPU (device.cuh).
#pragma once

#include "device.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace leanformer {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeyTile = 32;       // keys per staged tile: one per lane while scoring
constexpr int kMaxHeadDim = 256;   // D and Dv; bounds the per-lane output registers
constexpr int64_t kMinChunk = 64;  // keys per chunk at least, so a block has work to amortize
constexpr int64_t kMaxGridYZ = 65535;

// Rows per warp: fewer for fp64 so that the largest (D = 256) tile fits in shared memory.
template <typename acc_t>
constexpr int rows_per_warp() {
  return sizeof(acc_t) == 8 ? 4 : 8;
}

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// A [B, L, H, C] tensor addressed by its strides (the caches are not copied to be contiguous).
template <typename scalar_t>
struct Strided4 {
  const scalar_t* data;
  int64_t sb, sl, sh, sc;
  __device__ __forceinline__ const scalar_t& at(int64_t b, int64_t l, int64_t h, int64_t c) const {
    return data[b * sb + l * sl + h * sh + c * sc];
  }
};


template <typename scalar_t, typename acc_t>
struct TreeAttentionParams {
  const scalar_t* q;       // [B, T, Hq, D] contiguous
  Strided4<scalar_t> k_cache, v_cache;
  const int64_t* cache_lens;
  const scalar_t* k_tree;  // [B, T, Hkv, D] contiguous
  const scalar_t* v_tree;  // [B, T, Hkv, Dv] contiguous
  const bool* mask;        // [T, T] rows contiguous, batch stride mask_sb (0 when shared)
  int64_t mask_sb;
  acc_t* o_part;           // [chunks, B, Hkv, R, Dv], normalized per chunk
  acc_t* lse_part;         // [chunks, B, Hkv, R], log2-sum-exp of the scaled scores
  int B, T, Hq, Hkv, G, D, Dv;
  int64_t L_max, chunk_len;
  acc_t scale_log2;        // scale * log2(e)
};

// Dynamic shared memory of one block (in acc_t elements): q rows [RB][Dp], K tile
// [32][Dp + 1] (odd stride: lane j reads row j without bank conflicts), V tile [32][Dvp],
// probabilities [kWarps][RPW][32].
struct TileLayout {
  int Dp, Ks, Dvp, rows;
  __host__ __device__ int q_off() const { return 0; }
  __host__ __device__ int k_off() const { return rows * Dp; }
  __host__ __device__ int v_off() const { return k_off() + kKeyTile * Ks; }
  __host__ __device__ int p_off() const { return v_off() + kKeyTile * Dvp; }
  __host__ __device__ int total() const { return p_off() + rows * kKeyTile; }
};

__host__ __device__ inline TileLayout tile_layout(int D, int dv_per_lane, int rows) {
  TileLayout t;
  t.Dp = round_up(D, 4);
  t.Ks = t.Dp + 1;
  t.Dvp = dv_per_lane * 32;
  t.rows = rows;
  return t;
}

// Stages the kKeyTile keys (or values) k0, k0 + 1, ... of (b, kv head) into dst[j * stride + c]
// for c < width, zero past c_end and past the C real columns: key < L is cache slot key, the
// rest is tree node key - L of `tree` ([B, T, Hkv, C] contiguous).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_tile(acc_t* dst, int stride, int width, int C,
                                           const Strided4<scalar_t>& cache,
                                           const scalar_t* __restrict__ tree, int b, int hkv,
                                           int64_t k0, int64_t c_end, int64_t L, int T, int Hkv) {
  for (int idx = threadIdx.x; idx < kKeyTile * width; idx += kThreads) {
    const int j = idx / width, c = idx % width;
    const int64_t key = k0 + j;
    acc_t val = 0;
    if (key < c_end && c < C) {
      val = key < L ? static_cast<acc_t>(cache.at(b, key, hkv, c))
                    : static_cast<acc_t>(tree[((static_cast<int64_t>(b) * T + (key - L)) * Hkv + hkv) * C + c]);
    }
    dst[j * stride + c] = val;
  }
}

// kD: the head dim when known at compile time (64, 128), 0 for the generic path.
// kDvPerLane: output columns per lane (Dv <= 32 * kDvPerLane).
template <typename scalar_t, typename acc_t, int kD, int kDvPerLane>
__global__ void __launch_bounds__(kThreads)
    tree_attention_partial_kernel(const TreeAttentionParams<scalar_t, acc_t> p) {
  constexpr int RPW = rows_per_warp<acc_t>();
  constexpr int RB = RPW * kWarps;
  LF_DYNAMIC_SHARED_ALIGNED(unsigned char, smem_raw, 16);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int D = kD ? kD : p.D;
  const int Dv = p.Dv;
  const TileLayout lay = tile_layout(D, kDvPerLane, RB);
  acc_t* q_s = smem + lay.q_off();
  acc_t* k_s = smem + lay.k_off();
  acc_t* v_s = smem + lay.v_off();
  acc_t* p_s = smem + lay.p_off();

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b = blockIdx.y / p.Hkv, hkv = blockIdx.y % p.Hkv;
  const int R = p.G * p.T;
  const int row0 = blockIdx.z * RB;
  const int64_t L = p.cache_lens[b];
  CUDA_KERNEL_ASSERT(L >= 0 && L <= p.L_max && "cache_lens must be in [0, k_cache.shape[1]]");
  const int64_t total = L + p.T;
  const int64_t c_begin = blockIdx.x * p.chunk_len;
  if (c_begin >= total) return;  // past this sequence's keys (uniform over the block)
  const int64_t c_end = c_begin + p.chunk_len < total ? c_begin + p.chunk_len : total;

  // q rows of this tile, pre-scaled; zero past R and past D (the padding the loops run over).
  for (int idx = tid; idx < RB * lay.Dp; idx += kThreads) {
    const int r = idx / lay.Dp, d = idx % lay.Dp, row = row0 + r;
    acc_t val = 0;
    if (row < R && d < D) {
      const int t = row / p.G, hq = hkv * p.G + row % p.G;
      val = static_cast<acc_t>(p.q[((static_cast<int64_t>(b) * p.T + t) * p.Hq + hq) * D + d]) *
            p.scale_log2;
    }
    q_s[idx] = val;
  }

  acc_t m[RPW], l[RPW], o[RPW][kDvPerLane];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = neg_inf<acc_t>();
    l[r] = 0;  // this lane's share of the denominator; summed over the warp at the end
#pragma unroll
    for (int i = 0; i < kDvPerLane; ++i) o[r][i] = 0;
  }
  // Tree node t of this warp's row r (for the mask), -1 past R.
  int node[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + warp * RPW + r;
    node[r] = row < R ? row / p.G : -1;
  }
  const bool* mask_b = p.mask + b * p.mask_sb;

  for (int64_t k0 = c_begin; k0 < c_end; k0 += kKeyTile) {
    __syncthreads();  // the previous tile (and, first time, q_s) is complete / consumed
    stage_tile(k_s, lay.Ks, lay.Dp, D, p.k_cache, p.k_tree, b, hkv, k0, c_end, L, p.T, p.Hkv);
    stage_tile(v_s, lay.Dvp, lay.Dvp, Dv, p.v_cache, p.v_tree, b, hkv, k0, c_end, L, p.T, p.Hkv);
    __syncthreads();

    // Scores: lane = key of the tile, against the warp's RPW rows (K row held across rows).
    acc_t s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0;
    const acc_t* k_row = k_s + lane * lay.Ks;
    const acc_t* q_w = q_s + warp * RPW * lay.Dp;
#pragma unroll 4
    for (int d = 0; d < lay.Dp; d += 4) {
      const acc_t k0v = k_row[d], k1v = k_row[d + 1], k2v = k_row[d + 2], k3v = k_row[d + 3];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const acc_t* qr = q_w + r * lay.Dp + d;
        if constexpr (std::is_same_v<acc_t, float>) {
          const float4 q4 = *reinterpret_cast<const float4*>(qr);  // broadcast, 16 B aligned
          s[r] += q4.x * k0v + q4.y * k1v + q4.z * k2v + q4.w * k3v;
        } else {
          s[r] += qr[0] * k0v + qr[1] * k1v + qr[2] * k2v + qr[3] * k3v;
        }
      }
    }

    // Online softmax (base 2). Keys past the chunk and tree nodes outside the row's ancestor
    // set get -inf; m_safe keeps exp2 away from (-inf) - (-inf) while a row has seen nothing.
    const int64_t key = k0 + lane;
    const bool in_chunk = key < c_end;
    const bool is_tree = key >= L;
    const int tree_j = static_cast<int>(key - L);
    acc_t* p_w = p_s + warp * RPW * kKeyTile;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const bool visible =
          in_chunk && (!is_tree || (node[r] >= 0 && mask_b[static_cast<int64_t>(node[r]) * p.T + tree_j]));
      const acc_t sv = visible ? s[r] : neg_inf<acc_t>();
      const acc_t m_new = fmax(m[r], warp_max(sv));
      const acc_t m_safe = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
      const acc_t alpha = exp2_(m[r] - m_safe);
      const acc_t pv = exp2_(sv - m_safe);
      l[r] = l[r] * alpha + pv;
#pragma unroll
      for (int i = 0; i < kDvPerLane; ++i) o[r][i] *= alpha;
      m[r] = m_new;
      p_w[r * kKeyTile + lane] = pv;
    }
    __syncwarp();

    // o += p @ V: lane owns columns lane + 32 i; each V row is read once for all RPW rows.
#pragma unroll 4
    for (int j = 0; j < kKeyTile; ++j) {
      acc_t v[kDvPerLane];
#pragma unroll
      for (int i = 0; i < kDvPerLane; ++i) v[i] = v_s[j * lay.Dvp + lane + 32 * i];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const acc_t pj = p_w[r * kKeyTile + j];
#pragma unroll
        for (int i = 0; i < kDvPerLane; ++i) o[r][i] += pj * v[i];
      }
    }
  }

  const int64_t chunk = blockIdx.x;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = row0 + warp * RPW + r;
    const acc_t l_sum = warp_sum(l[r]);
    if (row >= R) continue;
    const int64_t prow = ((chunk * p.B + b) * p.Hkv + hkv) * R + row;
    const acc_t inv = l_sum > acc_t(0) ? acc_t(1) / l_sum : acc_t(0);
#pragma unroll
    for (int i = 0; i < kDvPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < Dv) p.o_part[prow * Dv + c] = o[r][i] * inv;
    }
    if (lane == 0) p.lse_part[prow] = l_sum > acc_t(0) ? m[r] + log2_(l_sum) : neg_inf<acc_t>();
  }
}

// One warp per output row (b, t, hq): o = sum_c 2^(lse_c - M) o_c / sum_c 2^(lse_c - M) over
// this sequence's active chunks. A row that saw no key at all (every lse -inf) gets zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    tree_attention_merge_kernel(const acc_t* __restrict__ o_part,
                                const acc_t* __restrict__ lse_part,
                                const int64_t* __restrict__ cache_lens, scalar_t* __restrict__ out,
                                int B, int T, int Hq, int Hkv, int G, int Dv, int64_t chunk_len) {
  const int64_t orow = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (orow >= static_cast<int64_t>(B) * T * Hq) return;
  const int b = static_cast<int>(orow / (static_cast<int64_t>(T) * Hq));
  const int rem = static_cast<int>(orow % (static_cast<int64_t>(T) * Hq));
  const int t = rem / Hq, hq = rem % Hq;
  const int hkv = hq / G, row = t * G + hq % G, R = G * T;
  const int64_t chunks = (cache_lens[b] + T + chunk_len - 1) / chunk_len;
  const int64_t stride = static_cast<int64_t>(B) * Hkv * R;  // between chunks, in rows
  const int64_t prow0 = (static_cast<int64_t>(b) * Hkv + hkv) * R + row;

  acc_t M = neg_inf<acc_t>();
  for (int64_t c = 0; c < chunks; ++c) M = fmax(M, lse_part[c * stride + prow0]);
  scalar_t* o_row = out + orow * Dv;
  if (M == neg_inf<acc_t>()) {
    for (int col = lane; col < Dv; col += 32) o_row[col] = scalar_t(0);
    return;
  }
  for (int col0 = 0; col0 < Dv; col0 += 32 * 4) {
    acc_t acc[4] = {0, 0, 0, 0};
    acc_t wsum = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const acc_t w = exp2_(lse_part[c * stride + prow0] - M);
      wsum += w;
      const acc_t* src = o_part + (c * stride + prow0) * Dv;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = col0 + lane + 32 * i;
        if (col < Dv) acc[i] += w * src[col];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = col0 + lane + 32 * i;
      if (col < Dv) o_row[col] = static_cast<scalar_t>(acc[i] / wsum);
    }
  }
}

// One warp per (b, h, node i): o_i = (phi(q_i) S + sum_j a_ij v_j) / (phi(q_i).z + sum_j a_ij
// + eps), a_ij = phi(q_i).phi(k_j) over j in the mask row of i. phi(q_i) is staged per warp.
// Columns go 32 * kCols at a time (the ancestor dots are recomputed per column group, which
// only happens for Dv > 128).
constexpr int kLinCols = 4;

template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;  // NaN passes through, as in F.relu
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    tree_linear_attention_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                 const scalar_t* __restrict__ v, const acc_t* __restrict__ S,
                                 const acc_t* __restrict__ z, const bool* __restrict__ mask,
                                 int64_t mask_sb, scalar_t* __restrict__ out, int B, int T, int H,
                                 int Dk, int Dv, acc_t eps) {
  LF_DYNAMIC_SHARED_ALIGNED(unsigned char, smem_raw, 16);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t* phiq = reinterpret_cast<acc_t*>(smem_raw) + warp * Dk;
  const int bh = blockIdx.x, b = bh / H, h = bh % H;
  const int i = blockIdx.y * kWarps + warp;
  if (i >= T) return;  // no block-wide sync below
  const auto tok = [&](int t) { return (static_cast<int64_t>(b) * T + t) * H + h; };

  for (int d = lane; d < Dk; d += 32) phiq[d] = relu(static_cast<acc_t>(q[tok(i) * Dk + d]));
  __syncwarp();
  // phi(q_i) . z, the prefix part of the denominator.
  acc_t zpart = 0;
  const acc_t* z_bh = z + static_cast<int64_t>(bh) * Dk;
  for (int d = lane; d < Dk; d += 32) zpart += phiq[d] * z_bh[d];
  const acc_t den_prefix = warp_sum(zpart);

  const bool* mask_row = mask + b * mask_sb + static_cast<int64_t>(i) * T;
  const acc_t* S_bh = S + static_cast<int64_t>(bh) * Dk * Dv;
  for (int col0 = 0; col0 < Dv; col0 += 32 * kLinCols) {
    acc_t acc[kLinCols];
#pragma unroll
    for (int c = 0; c < kLinCols; ++c) acc[c] = 0;
    acc_t den = den_prefix;
    for (int j0 = 0; j0 < T; j0 += 32) {
      unsigned anc = __ballot_sync(0xffffffffu, j0 + lane < T && mask_row[j0 + lane]);
      while (anc) {
        const int j = j0 + __ffs(anc) - 1;
        anc &= anc - 1;
        acc_t part = 0;
        for (int d = lane; d < Dk; d += 32)
          part += phiq[d] * relu(static_cast<acc_t>(k[tok(j) * Dk + d]));
        const acc_t a = warp_sum(part);
        den += a;
#pragma unroll
        for (int c = 0; c < kLinCols; ++c) {
          const int col = col0 + lane + 32 * c;
          if (col < Dv) acc[c] += a * static_cast<acc_t>(v[tok(j) * Dv + col]);
        }
      }
    }
    for (int d = 0; d < Dk; ++d) {
      const acc_t pq = phiq[d];
#pragma unroll
      for (int c = 0; c < kLinCols; ++c) {
        const int col = col0 + lane + 32 * c;
        if (col < Dv) acc[c] += pq * S_bh[static_cast<int64_t>(d) * Dv + col];
      }
    }
    const acc_t inv = acc_t(1) / (den + eps);
#pragma unroll
    for (int c = 0; c < kLinCols; ++c) {
      const int col = col0 + lane + 32 * c;
      if (col < Dv) out[tok(i) * Dv + col] = static_cast<scalar_t>(acc[c] * inv);
    }
  }
}

}  // namespace
}  // namespace leanformer
