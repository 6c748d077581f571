// The cub block collectives the kernels use, for the CUDA emulation (cuda_emu.h): the same
// interface and validity rules as cub (Reduce / Sum valid in thread 0 only; reusing a
// TempStorage needs a __syncthreads by the caller), and cub's default algorithms' order of
// floating-point additions, so that sums match a GPU's bit for bit:
//   BlockReduce (BLOCK_REDUCE_WARP_REDUCTIONS): each warp's shfl_down tree (offsets 1, 2, 4,
//     8, 16), then thread 0 adds the warp results in warp order.
//   BlockScan (BLOCK_SCAN_RAKING): 32 raking threads each add a segment of
//     ceil(threads / 32) inputs in order, an exclusive Kogge-Stone warp scan (shfl_up 1, 2, 4,
//     8, 16) of the segment sums, then each segment is scanned in order from its prefix.
// One difference that only shows in the cost: thread 0 computes the results for the block.
#pragma once

#include "cuda_emu.h"

namespace cub {

template <class T, int BLOCK_THREADS>
class BlockReduce {
 public:
  struct TempStorage {
    T in[BLOCK_THREADS];
  };
  explicit BlockReduce(TempStorage& s) : s_(s) {}

  template <class Op>
  T Reduce(T x, Op op) {
    const int tid = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y);
    s_.in[tid] = x;
    ::leanformer::__syncthreads();
    if (tid != 0) return x;  // undefined in cub outside thread 0
    constexpr int W = 32, WARPS = (BLOCK_THREADS + W - 1) / W;
    T agg{};
    for (int w = 0; w < WARPS; ++w) {
      const int n = BLOCK_THREADS - w * W < W ? BLOCK_THREADS - w * W : W;
      T lane[W];
      for (int l = 0; l < n; ++l) lane[l] = s_.in[w * W + l];
      for (int off = 1; off < W; off <<= 1)  // WarpReduceShfl: x = op(x, shfl_down(x, off))
        for (int l = 0; l + off < n; l += 2 * off) lane[l] = op(lane[l], lane[l + off]);
      agg = w == 0 ? lane[0] : op(agg, lane[0]);
    }
    return agg;
  }
  T Sum(T x) {
    return Reduce(x, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& s_;
};

template <class T, int BLOCK_THREADS>
class BlockScan {
  static constexpr int kMaxRaking = BLOCK_THREADS < 32 ? BLOCK_THREADS : 32;
  static constexpr int kSegment = (BLOCK_THREADS + kMaxRaking - 1) / kMaxRaking;
  static constexpr int kRaking = (BLOCK_THREADS + kSegment - 1) / kSegment;

 public:
  struct TempStorage {
    T in[BLOCK_THREADS];
    T out[BLOCK_THREADS];
    T aggregate;
  };
  explicit BlockScan(TempStorage& s) : s_(s) {}

  void ExclusiveSum(T x, T& out, T& aggregate) {
    const int tid = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y);
    s_.in[tid] = x;
    ::leanformer::__syncthreads();
    if (tid == 0) scan();
    ::leanformer::__syncthreads();
    out = s_.out[tid];
    aggregate = s_.aggregate;
  }
  void ExclusiveSum(T x, T& out) {
    T aggregate;
    ExclusiveSum(x, out, aggregate);
  }

 private:
  static void warp_exclusive_scan(const T* in, int n, T* excl, T& total) {
    T inc[32];
    for (int l = 0; l < n; ++l) inc[l] = in[l];
    for (int off = 1; off < 32; off <<= 1) {  // inclusive: x = shfl_up(x, off) + x for lane >= off
      T prev[32];
      for (int l = 0; l < n; ++l) prev[l] = inc[l];
      for (int l = off; l < n; ++l) inc[l] = prev[l - off] + prev[l];
    }
    total = inc[n - 1];
    for (int l = 0; l < n; ++l) excl[l] = l == 0 ? T{} : T{} + inc[l - 1];  // initial value 0 + x
  }

  void scan() {
    if (kRaking == BLOCK_THREADS) {  // warp-synchronous: one warp scans the inputs directly
      warp_exclusive_scan(s_.in, BLOCK_THREADS, s_.out, s_.aggregate);
      return;
    }
    T partial[32], prefix[32];
    for (int r = 0; r < kRaking; ++r) {  // upsweep: each raking thread's segment, in order
      const int i0 = r * kSegment;
      T p = s_.in[i0];
      for (int i = i0 + 1; i < i0 + kSegment && i < BLOCK_THREADS; ++i) p = p + s_.in[i];
      partial[r] = p;
    }
    warp_exclusive_scan(partial, kRaking, prefix, s_.aggregate);
    for (int r = 0; r < kRaking; ++r) {  // downsweep
      T inc = prefix[r];
      for (int i = r * kSegment; i < (r + 1) * kSegment && i < BLOCK_THREADS; ++i) {
        s_.out[i] = inc;
        inc = inc + s_.in[i];
      }
    }
  }

  TempStorage& s_;
};

}  // namespace cub
