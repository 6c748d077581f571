// The kernels of simplified linear attention (SLAB, phi = ReLU): forward, backward and the
// decode step, torch-free (pointers, sizes in), written in the "fused recurrent" form of
// flash-linear-attention; the launchers are in linear_attention_cuda.cu. Compiled by nvcc for
// the GPU and, in the emulation build, for the CPU (device.cuh).
//
// Every scan kernel runs one block per (b * H + h, tile of 32 v columns, time split). The lane
// is the v column and the 8 warps split the Dk rows of the state (row i = warp + r * 8, so a
// small Dk still spreads over all warps); each thread keeps its RPT entries of one S column in
// registers while the block walks its tokens in order.
// The normalizer z (and its gradient g) is the state column whose v is 1. Every v tile needs it
// for den, so instead of giving it a lane in one tile, every block carries it with thread tid
// owning row tid: one register, and no cross-block dependency.
// Tokens are staged CT at a time in shared memory, so the cross-warp reductions cost a few
// __syncthreads per chunk instead of per token.
// Kernels declare __launch_bounds__(kThreads, 1): without the minimum-blocks hint ptxas trades
// a few spills of the register-resident state for occupancy, and these sequential scans are
// latency bound, not occupancy bound.
#pragma once

#include "device.cuh"

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;                 // v columns per block: one per lane
constexpr int kMaxRowsPerThread = 32;     // register budget for a thread's slice of S
constexpr int kMaxDk = kWarps * kMaxRowsPerThread;
constexpr int64_t kSplitLen = 64;         // tokens per block when time is split (non-causal)
constexpr int64_t kMaxGridYZ = 65535;

// Tokens staged per chunk: keeps the shared memory of the largest (Dk = 256) instantiation
// under the 48 KB static limit for both fp32 and fp64 accumulation.
template <typename acc_t>
constexpr int chunk_len() {
  return sizeof(acc_t) == 8 ? 4 : 8;
}

// NaN passes through, as in F.relu and the CPU kernels (std::max(x, 0)): a NaN input must
// not turn into a silently finite output.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t x) {
  return x < acc_t(0) ? acc_t(0) : x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Stages relu(x) of ntok tokens (token stride tok_stride) into dst[CT][DkP]. The zero padding
// past ntok and Dk lets the register loops run without bounds checks.
template <int CT, int DkP, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_features(acc_t (*dst)[DkP], const scalar_t* __restrict__ src,
                                               int64_t tok_stride, int ntok, int Dk) {
  for (int idx = threadIdx.x; idx < CT * DkP; idx += kThreads) {
    const int tok = idx / DkP, i = idx % DkP;
    dst[tok][i] =
        (tok < ntok && i < Dk) ? relu(static_cast<acc_t>(src[tok * tok_stride + i])) : acc_t(0);
  }
}

// Stages this block's ncols (<= kTile) columns of ntok tokens into dst[CT][kTile], zero padded.
template <int CT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_columns(acc_t (*dst)[kTile],
                                              const scalar_t* __restrict__ src,
                                              int64_t tok_stride, int ntok, int ncols) {
  for (int idx = threadIdx.x; idx < CT * kTile; idx += kThreads) {
    const int tok = idx / kTile, c = idx % kTile;
    dst[tok][c] = (tok < ntok && c < ncols) ? static_cast<acc_t>(src[tok * tok_stride + c])
                                            : acc_t(0);
  }
}

// Stages one per-token scalar of the [B, T, H] workspaces (token stride H), zero padded.
template <int CT, typename acc_t>
__device__ __forceinline__ void stage_scalars(acc_t* dst, const acc_t* __restrict__ src,
                                              int64_t tok_stride, int ntok) {
  if (static_cast<int>(threadIdx.x) < CT) {
    const int tok = threadIdx.x;
    dst[tok] = tok < ntok ? src[tok * tok_stride] : acc_t(0);
  }
}

// Block coordinates shared by the scan kernels.
struct ScanBlock {
  int64_t bh, b;
  int h, col0, warp, lane;
  int64_t t_begin, t_end;
};

__device__ __forceinline__ ScanBlock scan_block(int H, int64_t T, int64_t split_len) {
  ScanBlock s;
  // 32-bit division (B * H <= INT_MAX is checked on the host): a 64-bit one is an emulated
  // subroutine call.
  const int bh = blockIdx.x;
  s.bh = bh;
  s.b = bh / H;
  s.h = bh % H;
  s.col0 = blockIdx.y * kTile;
  s.warp = threadIdx.x / 32;
  s.lane = threadIdx.x % 32;
  s.t_begin = blockIdx.z * split_len;
  s.t_end = s.t_begin + split_len < T ? s.t_begin + split_len : T;
  return s;
}

// This thread's slice of the state (rows warp + r * kWarps of S's column `col`, in
// registers) and returns its row threadIdx.x of z; zeros without a state or past Dk, Dv.
template <int RPT, typename acc_t>
__device__ __forceinline__ acc_t load_state_slice(acc_t (&s)[RPT], const acc_t* __restrict__ S_in,
                                                  const acc_t* __restrict__ z_in,
                                                  const ScanBlock& blk, int col, int Dk, int Dv) {
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int i = blk.warp + r * kWarps;
    s[r] = (S_in != nullptr && i < Dk && col < Dv) ? S_in[(blk.bh * Dk + i) * Dv + col]
                                                   : acc_t(0);
  }
  const int zrow = threadIdx.x;
  return (z_in != nullptr && zrow < Dk) ? z_in[blk.bh * Dk + zrow] : acc_t(0);
}

// The inverse of load_state_slice: atomically adds this thread's slice into (S_out, z_out),
// z from the first v tile only. Atomic because time may be split over several blocks.
template <int RPT, typename acc_t>
__device__ __forceinline__ void add_state_slice(const acc_t (&s)[RPT], acc_t zi, acc_t* S_out,
                                                acc_t* z_out, const ScanBlock& blk, int col,
                                                int Dk, int Dv) {
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int i = blk.warp + r * kWarps;
    if (i < Dk && col < Dv) atomicAdd(&S_out[(blk.bh * Dk + i) * Dv + col], s[r]);
  }
  const int zrow = threadIdx.x;
  if (blockIdx.y == 0 && zrow < Dk) atomicAdd(&z_out[blk.bh * Dk + zrow], zi);
}

// Forward scan over the tokens [t_begin, t_end) of one (b, h, v tile), starting from state
// (S_in, z_in) (nullptr: zero).
//   UPDATE: add kf^T v and kf to the state per token, then atomically add the final state into
//           (S_out, z_out). Atomic because non-causal sums split time over several blocks.
//   OUTPUT: o_t = qf_t S / (qf_t . z + eps) with the state after token t's update (causal
//           includes the current token), or with the fixed state when !UPDATE.
// Causal = <UPDATE, OUTPUT> over all of T; non-causal = <UPDATE> sums, then <OUTPUT>.
template <typename scalar_t, typename acc_t, int RPT, bool UPDATE, bool OUTPUT>
__global__ void __launch_bounds__(kThreads, 1)
    sla_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, scalar_t* __restrict__ o,
                       const acc_t* __restrict__ S_in, const acc_t* __restrict__ z_in,
                       acc_t* __restrict__ S_out, acc_t* __restrict__ z_out, int64_t T, int H,
                       int Dk, int Dv, int64_t split_len, acc_t eps) {
  constexpr int CT = chunk_len<acc_t>();
  constexpr int DkP = kWarps * RPT;
  __shared__ acc_t qs[CT][DkP];
  __shared__ acc_t ks[CT][DkP];
  __shared__ acc_t vs[CT][kTile];
  __shared__ acc_t num_part[kWarps][CT][kTile];
  __shared__ acc_t den_part[kWarps][CT];

  const ScanBlock blk = scan_block(H, T, split_len);
  const int col = blk.col0 + blk.lane;
  const int zrow = threadIdx.x;

  acc_t s[RPT];
  acc_t zi = load_state_slice(s, S_in, z_in, blk, col, Dk, Dv);

  for (int64_t c0 = blk.t_begin; c0 < blk.t_end; c0 += CT) {
    const int ntok = static_cast<int>(blk.t_end - c0 < CT ? blk.t_end - c0 : CT);
    const int64_t row0 = (blk.b * T + c0) * H + blk.h;  // row of (b, c0, h) in [B*T*H, D]
    if constexpr (OUTPUT) stage_features<CT, DkP>(qs, q + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
    if constexpr (UPDATE) {
      stage_features<CT, DkP>(ks, k + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
      stage_columns<CT>(vs, v + row0 * Dv + blk.col0, int64_t(H) * Dv, ntok, Dv - blk.col0);
    }
    __syncthreads();

    for (int tok = 0; tok < ntok; ++tok) {
      acc_t num = 0;
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int i = blk.warp + r * kWarps;
        if constexpr (UPDATE) s[r] += ks[tok][i] * vs[tok][blk.lane];
        if constexpr (OUTPUT) num += qs[tok][i] * s[r];
      }
      if constexpr (OUTPUT) num_part[blk.warp][tok][blk.lane] = num;
    }
    for (int tok = 0; tok < ntok; ++tok) {
      if constexpr (UPDATE) {
        if (zrow < DkP) zi += ks[tok][zrow];
      }
      if constexpr (OUTPUT) {
        const acc_t p = warp_sum(zrow < DkP ? qs[tok][zrow] * zi : acc_t(0));
        if (blk.lane == 0) den_part[blk.warp][tok] = p;
      }
    }

    if constexpr (OUTPUT) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < CT * kTile; idx += kThreads) {
        const int tok = idx / kTile, c = idx % kTile;
        if (tok < ntok && blk.col0 + c < Dv) {
          acc_t num = 0, den = eps;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) {
            num += num_part[w][tok][c];
            den += den_part[w][tok];
          }
          o[(row0 + int64_t(tok) * H) * Dv + blk.col0 + c] = static_cast<scalar_t>(num / den);
        }
      }
    }
    // The next chunk overwrites the staged tokens.
    __syncthreads();
  }

  if constexpr (UPDATE) add_state_slice(s, zi, S_out, z_out, blk, col, Dk, Dv);
}

// out[row] = a[row, :] . b[row, :] for rows of length D: dO_t . o_t, the full-Dv reduction
// that dden needs, which no single v tile can form.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    sla_row_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                       acc_t* __restrict__ out, int64_t rows, int D) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Whole warps exit together, so the shuffles below stay convergent.
  if (row >= rows) return;
  acc_t sum = 0;
  for (int c = lane; c < D; c += 32)
    sum += static_cast<acc_t>(a[row * D + c]) * static_cast<acc_t>(b[row * D + c]);
  sum = warp_sum(sum);
  if (lane == 0) out[row] = sum;
}

// Backward, forward-time pass: den_t (recomputed from z_t), inv_den_t = 1 / den_t,
// dden_t = -(dO_t . o_t) / den_t, and dq_t = (dnum_t S_t^T + dden_t z_t) * (q_t > 0).
// CAUSAL: the state starts at (S_in, z_in) and includes token t before it is used; otherwise
// (S_in, z_in) are the full sums and time may be split. Tile 0 stores inv_den / dden for the
// reverse pass and adds the z term; every tile adds its columns' share of dq atomically.
template <typename scalar_t, typename acc_t, int RPT, bool CAUSAL>
__global__ void __launch_bounds__(kThreads, 1)
    sla_backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                           const scalar_t* __restrict__ v, const scalar_t* __restrict__ dO,
                           const acc_t* __restrict__ dO_dot_o, const acc_t* __restrict__ S_in,
                           const acc_t* __restrict__ z_in, acc_t* __restrict__ inv_den_out,
                           acc_t* __restrict__ dden_out, acc_t* __restrict__ dq_acc, int64_t T,
                           int H, int Dk, int Dv, int64_t split_len, acc_t eps) {
  constexpr int CT = chunk_len<acc_t>();
  constexpr int DkP = kWarps * RPT;
  __shared__ acc_t qs[CT][DkP];
  __shared__ acc_t ks[CT][DkP];
  __shared__ acc_t dqs[CT][DkP];
  __shared__ acc_t vs[CT][kTile];
  __shared__ acc_t dOs[CT][kTile];
  __shared__ acc_t den_part[kWarps][CT];
  __shared__ acc_t dots[CT];
  __shared__ acc_t inv_den_s[CT];
  __shared__ acc_t dden_s[CT];

  const ScanBlock blk = scan_block(H, T, split_len);
  const int col = blk.col0 + blk.lane;
  const int zrow = threadIdx.x;

  acc_t s[RPT];
  acc_t zi = load_state_slice(s, S_in, z_in, blk, col, Dk, Dv);

  for (int64_t c0 = blk.t_begin; c0 < blk.t_end; c0 += CT) {
    const int ntok = static_cast<int>(blk.t_end - c0 < CT ? blk.t_end - c0 : CT);
    const int64_t row0 = (blk.b * T + c0) * H + blk.h;
    stage_features<CT, DkP>(qs, q + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
    stage_columns<CT>(dOs, dO + row0 * Dv + blk.col0, int64_t(H) * Dv, ntok, Dv - blk.col0);
    stage_scalars<CT>(dots, dO_dot_o + row0, H, ntok);
    if constexpr (CAUSAL) {
      stage_features<CT, DkP>(ks, k + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
      stage_columns<CT>(vs, v + row0 * Dv + blk.col0, int64_t(H) * Dv, ntok, Dv - blk.col0);
    }
    __syncthreads();

    // z column first: dq needs den_t, a reduction over all Dk rows, before any S column can
    // be used. z_t is kept per token in registers for the dden_t z_t term.
    acc_t zt[CT];
#pragma unroll
    for (int tok = 0; tok < CT; ++tok) {
      if constexpr (CAUSAL) {
        if (zrow < DkP) zi += ks[tok][zrow];
      }
      zt[tok] = zi;
      const acc_t p = warp_sum(zrow < DkP ? qs[tok][zrow] * zi : acc_t(0));
      if (blk.lane == 0) den_part[blk.warp][tok] = p;
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < ntok) {
      const int tok = threadIdx.x;
      acc_t den = eps;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) den += den_part[w][tok];
      const acc_t inv_den = acc_t(1) / den;
      const acc_t dden = -dots[tok] * inv_den;
      inv_den_s[tok] = inv_den;
      dden_s[tok] = dden;
      if (blockIdx.y == 0) {
        inv_den_out[row0 + int64_t(tok) * H] = inv_den;
        dden_out[row0 + int64_t(tok) * H] = dden;
      }
    }
    __syncthreads();

    // S columns: dq_i += sum_j dnum_j S_t[i, j], the sum over this tile's lanes.
    for (int tok = 0; tok < ntok; ++tok) {
      const acc_t dnum = dOs[tok][blk.lane] * inv_den_s[tok];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int i = blk.warp + r * kWarps;
        // i depends only on the warp, so the shuffle inside stays warp-uniform.
        if (i < Dk) {
          if constexpr (CAUSAL) s[r] += ks[tok][i] * vs[tok][blk.lane];
          const acc_t x = warp_sum(dnum * s[r]);
          if (blk.lane == 0) dqs[tok][i] = x;
        }
      }
    }
    __syncthreads();

    // Flush with thread = row: coalesced atomics; relu(q) > 0 exactly when q > 0.
    if (zrow < Dk) {
#pragma unroll
      for (int tok = 0; tok < CT; ++tok) {
        if (tok < ntok && qs[tok][zrow] > acc_t(0)) {
          acc_t val = dqs[tok][zrow];
          if (blockIdx.y == 0) val += dden_s[tok] * zt[tok];
          atomicAdd(&dq_acc[(row0 + int64_t(tok) * H) * Dk + zrow], val);
        }
      }
    }
    __syncthreads();
  }
}

// Backward, reverse-time pass over one (b, h, v tile), with G (Dk x Dv slice) and g (Dk)
// starting at (G_in, g_in) (nullptr: zero).
//   UPDATE: walking t downward, G += qf_t^T dnum_t and g += dden_t qf_t before token t is
//           used, so G_j = grad_S + sum_{t >= j} qf_t^T dnum_t includes t = j; the final
//           (G_0, g_0) is atomically added into (G_out, g_out) (time may be split).
//   OUTPUT: dv_j = kf_j G_j (complete in the block: it holds all Dk rows) and
//           dk_j = (v_j G_j^T + g_j) * (k_j > 0) (atomic across v tiles; tile 0 adds g).
// Causal = <UPDATE, OUTPUT> over all of T; non-causal = <UPDATE> sums, then <OUTPUT>.
template <typename scalar_t, typename acc_t, int RPT, bool UPDATE, bool OUTPUT>
__global__ void __launch_bounds__(kThreads, 1)
    sla_backward_dkv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ dO,
                            const acc_t* __restrict__ inv_den, const acc_t* __restrict__ dden,
                            const acc_t* __restrict__ G_in, const acc_t* __restrict__ g_in,
                            acc_t* __restrict__ G_out, acc_t* __restrict__ g_out,
                            acc_t* __restrict__ dk_acc, scalar_t* __restrict__ dv, int64_t T,
                            int H, int Dk, int Dv, int64_t split_len) {
  constexpr int CT = chunk_len<acc_t>();
  constexpr int DkP = kWarps * RPT;
  __shared__ acc_t qs[CT][DkP];
  __shared__ acc_t ks[CT][DkP];
  __shared__ acc_t dks[CT][DkP];
  __shared__ acc_t vs[CT][kTile];
  __shared__ acc_t dOs[CT][kTile];
  __shared__ acc_t dv_part[kWarps][CT][kTile];
  __shared__ acc_t inv_den_s[CT];
  __shared__ acc_t dden_s[CT];

  const ScanBlock blk = scan_block(H, T, split_len);
  const int col = blk.col0 + blk.lane;
  const int zrow = threadIdx.x;

  acc_t G[RPT];
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int i = blk.warp + r * kWarps;
    G[r] = (G_in != nullptr && i < Dk && col < Dv) ? G_in[(blk.bh * Dk + i) * Dv + col]
                                                   : acc_t(0);
  }
  acc_t gi = (g_in != nullptr && zrow < Dk) ? g_in[blk.bh * Dk + zrow] : acc_t(0);

  // Chunks are aligned to t_end so that every chunk but the first one in time is full.
  for (int64_t c_end = blk.t_end; c_end > blk.t_begin; c_end -= CT) {
    const int64_t c0 = c_end - CT > blk.t_begin ? c_end - CT : blk.t_begin;
    const int ntok = static_cast<int>(c_end - c0);
    const int64_t row0 = (blk.b * T + c0) * H + blk.h;
    if constexpr (UPDATE) {
      stage_features<CT, DkP>(qs, q + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
      stage_columns<CT>(dOs, dO + row0 * Dv + blk.col0, int64_t(H) * Dv, ntok, Dv - blk.col0);
      stage_scalars<CT>(inv_den_s, inv_den + row0, H, ntok);
      stage_scalars<CT>(dden_s, dden + row0, H, ntok);
    }
    if constexpr (OUTPUT) {
      stage_features<CT, DkP>(ks, k + row0 * Dk, int64_t(H) * Dk, ntok, Dk);
      stage_columns<CT>(vs, v + row0 * Dv + blk.col0, int64_t(H) * Dv, ntok, Dv - blk.col0);
    }
    __syncthreads();

    for (int tok = ntok - 1; tok >= 0; --tok) {
      acc_t dnum = 0;
      if constexpr (UPDATE) dnum = dOs[tok][blk.lane] * inv_den_s[tok];
      acc_t dv_acc = 0;
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int i = blk.warp + r * kWarps;
        // i depends only on the warp, so the shuffle inside stays warp-uniform.
        if (i < Dk) {
          if constexpr (UPDATE) G[r] += qs[tok][i] * dnum;
          if constexpr (OUTPUT) {
            dv_acc += ks[tok][i] * G[r];
            const acc_t x = warp_sum(vs[tok][blk.lane] * G[r]);
            if (blk.lane == 0) dks[tok][i] = x;
          }
        }
      }
      if constexpr (OUTPUT) dv_part[blk.warp][tok][blk.lane] = dv_acc;
    }

    // g column, per token in registers for the dk flush below.
    acc_t gt[CT];
#pragma unroll
    for (int tok = CT - 1; tok >= 0; --tok) {
      if constexpr (UPDATE) {
        if (tok < ntok && zrow < DkP) gi += dden_s[tok] * qs[tok][zrow];
      }
      gt[tok] = gi;
    }

    if constexpr (OUTPUT) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < CT * kTile; idx += kThreads) {
        const int tok = idx / kTile, c = idx % kTile;
        if (tok < ntok && blk.col0 + c < Dv) {
          acc_t sum = 0;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) sum += dv_part[w][tok][c];
          dv[(row0 + int64_t(tok) * H) * Dv + blk.col0 + c] = static_cast<scalar_t>(sum);
        }
      }
      if (zrow < Dk) {
#pragma unroll
        for (int tok = 0; tok < CT; ++tok) {
          if (tok < ntok && ks[tok][zrow] > acc_t(0)) {
            acc_t val = dks[tok][zrow];
            if (blockIdx.y == 0) val += gt[tok];
            atomicAdd(&dk_acc[(row0 + int64_t(tok) * H) * Dk + zrow], val);
          }
        }
      }
    }
    // The next chunk overwrites the staged tokens.
    __syncthreads();
  }

  if constexpr (UPDATE) add_state_slice(G, gi, G_out, g_out, blk, col, Dk, Dv);
}

}  // namespace
}  // namespace leanformer
