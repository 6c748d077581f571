// The kernels of tree verification (greedy and lossless sampling) and of the in-place KV
// cache compaction, torch-free (pointers, sizes and strides in), and their launch geometry;
// the launchers are in tree_verify_cuda.cu. Compiled by nvcc for the GPU and, in the
// emulation build, for the CPU (device.cuh).
//
// verify_tree_greedy: tree_argmax_kernel takes the argmax of every node's logits (one block per
// (b, node), the same ranking as torch.argmax: NaN above everything, ties to the lowest index),
// then tree_greedy_walk_kernel walks each tree with one warp: at node cur the lanes test 32
// candidate children at a time and a ballot picks the lowest-index match.
// verify_tree_sampling: one block per sequence runs the CPU kernel's walk step for step (see
// the comment at the kernel); the only parallel parts are the sums over the vocabulary.
// compact_kv_cache: one thread per (b, element of a cache row) moves that element along the
// accepted path in ascending order, so an in-place move never reads a slot it already wrote
// (accepted[b, j] >= j). Value checks that the CPU kernels raise as errors (cache_lens,
// accepted paths, parents, token ids) are device-side asserts here: checking them on the host
// would need a sync per decoding step.
#pragma once

#include "device.cuh"

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kArgmaxThreads = 256;
constexpr int kWalkWarps = 4;

// A candidate of the argmax: its value in the op math type and its index.
template <typename acc_t>
struct Best {
  acc_t v;
  int64_t i;
};

// torch.argmax's order: NaN ranks above every number (the first NaN wins), then the larger
// value, then the lower index.
template <typename acc_t>
__device__ __forceinline__ bool beats(const Best<acc_t>& a, const Best<acc_t>& b) {
  const bool a_nan = a.v != a.v, b_nan = b.v != b.v;
  if (a_nan || b_nan) return a_nan && (!b_nan || a.i < b.i);
  if (a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}

template <typename acc_t>
__device__ __forceinline__ Best<acc_t> warp_best(Best<acc_t> x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best<acc_t> o{__shfl_xor_sync(0xffffffffu, x.v, offset),
                  __shfl_xor_sync(0xffffffffu, x.i, offset)};
    if (beats(o, x)) x = o;
  }
  return x;
}

// Block-wide argmax of row[0, V); the result is valid in every thread.
template <typename scalar_t, typename acc_t>
__device__ int64_t block_argmax(const scalar_t* __restrict__ row, int64_t V) {
  __shared__ acc_t s_v[kArgmaxThreads / 32];
  __shared__ int64_t s_i[kArgmaxThreads / 32];
  Best<acc_t> best{static_cast<acc_t>(row[0]), 0};  // V >= 1 (checked)
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const Best<acc_t> c{static_cast<acc_t>(row[i]), i};
    if (beats(c, best)) best = c;
  }
  best = warp_best(best);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // s_v / s_i may still be read by a previous call
  if (lane == 0) s_v[warp] = best.v, s_i[warp] = best.i;
  __syncthreads();
  Best<acc_t> w{s_v[0], s_i[0]};
  for (int k = 1; k < kArgmaxThreads / 32; ++k) {
    const Best<acc_t> o{s_v[k], s_i[k]};
    if (beats(o, w)) w = o;
  }
  return w.i;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kArgmaxThreads)
    tree_argmax_kernel(const scalar_t* __restrict__ logits, int64_t V, int64_t* __restrict__ argmax) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t a = block_argmax<scalar_t, acc_t>(logits + row * V, V);
  if (threadIdx.x == 0) argmax[row] = a;
}

// The first child c > cur (parents[c] == cur) whose token is `token`, or -1; every lane gets
// the same answer.
__device__ __forceinline__ int64_t find_child(const int64_t* __restrict__ parents,
                                              const int64_t* __restrict__ tokens, int64_t T,
                                              int64_t cur, int64_t token) {
  const int lane = threadIdx.x % 32;
  for (int64_t base = cur + 1; base < T; base += 32) {
    const int64_t c = base + lane;
    bool hit = false;
    if (c < T) {
      const int64_t par = parents[c];
      CUDA_KERNEL_ASSERT(par >= 0 && par < c && "parents[i] must be in [0, i)");
      hit = par == cur && tokens[c] == token;
    }
    const unsigned m = __ballot_sync(0xffffffffu, hit);
    if (m) return base + __ffs(m) - 1;
  }
  return -1;
}

// Fills accepted[n, T) with -1 and writes the counts; called by a whole warp.
__device__ __forceinline__ void finish_path(int64_t* __restrict__ accepted_b, int64_t T,
                                            int64_t n, int64_t bonus, int64_t* num_accepted_b,
                                            int64_t* bonus_b) {
  const int lane = threadIdx.x % 32;
  for (int64_t j = n + lane; j < T; j += 32) accepted_b[j] = -1;
  if (lane == 0) {
    *num_accepted_b = n;
    *bonus_b = bonus;
  }
}

__global__ void __launch_bounds__(kWalkWarps * 32)
    tree_greedy_walk_kernel(const int64_t* __restrict__ argmax, const int64_t* __restrict__ tokens,
                            const int64_t* __restrict__ parents, int64_t parents_sb, int64_t B,
                            int64_t T, int64_t* __restrict__ accepted,
                            int64_t* __restrict__ num_accepted, int64_t* __restrict__ bonus) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWalkWarps) + threadIdx.x / 32;
  if (b >= B) return;
  const int lane = threadIdx.x % 32;
  const int64_t* tok_b = tokens + b * T;
  const int64_t* par_b = parents + b * parents_sb;
  int64_t* acc_b = accepted + b * T;
  if (lane == 0) acc_b[0] = 0;
  int64_t cur = 0, n = 1, target = argmax[b * T];
  while (true) {
    const int64_t child = find_child(par_b, tok_b, T, cur, target);
    if (child < 0) break;
    if (lane == 0) acc_b[n] = child;
    ++n;
    cur = child;
    target = argmax[b * T + cur];
  }
  finish_path(acc_b, T, n, target, num_accepted + b, bonus + b);
}

// ---- verify_tree_sampling ----
//
// The CPU kernel's rule, step for step, so that identical uniforms give identical results. At
// node `node` with target p (a probs row): mass = sum_x p(x) (fp64); the children in index
// order, -1 tokens and tokens already rejected at this node skipped, each consume the next
// uniform u and are accepted iff u * mass < p(x), else mass -= p(x) and x is rejected. When no
// child is accepted, the bonus is the first x whose running sum of the residual (p with the
// rejected tokens zeroed, zeros skipped) exceeds u * mass for the next uniform, or the last x
// with residual p > 0 if rounding runs past the end (token 0 if there is none). The sums are
// fp64 as on the CPU, but a block reduces them in another order, so a draw within ~1e-16 of
// a boundary could differ.

constexpr int kSampleThreads = 256;

// cub::Min / cub::Max are gone in CCCL 3 (CUDA 13); these work with every version.
struct MinOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? b : a; }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kSampleThreads)
    tree_sampling_kernel(const scalar_t* __restrict__ probs, int64_t T, int64_t V,
                         const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents,
                         int64_t parents_sb, const float* __restrict__ uniforms, int64_t U,
                         int64_t* __restrict__ accepted, int64_t* __restrict__ num_accepted,
                         int64_t* __restrict__ bonus) {
  using Reduce = cub::BlockReduce<double, kSampleThreads>;
  using ReduceIdx = cub::BlockReduce<int64_t, kSampleThreads>;
  using Scan = cub::BlockScan<double, kSampleThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ReduceIdx::TempStorage reduce_idx;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ double s_mass;
  __shared__ int64_t s_child, s_used, s_nrej;
  LF_DYNAMIC_SHARED(int64_t, s_rejected);  // [T]: tokens rejected at the current node

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t* tok_b = tokens + b * T;
  const int64_t* par_b = parents + b * parents_sb;
  const float* u_b = uniforms + b * U;
  int64_t* acc_b = accepted + b * T;
  int64_t node = 0, n = 1, used = 0;
  if (tid == 0) acc_b[0] = 0;

  while (true) {
    const scalar_t* p = probs + (b * T + node) * V;
    double part = 0;
    for (int64_t x = tid; x < V; x += kSampleThreads) part += static_cast<double>(p[x]);
    const double total = Reduce(tmp.reduce).Sum(part);  // valid in thread 0
    if (tid == 0) {
      double mass = total;
      int64_t nrej = 0, child = -1;
      for (int64_t c = node + 1; c < T; ++c) {
        const int64_t par = par_b[c];
        CUDA_KERNEL_ASSERT(par >= 0 && par < c && "parents[i] must be in [0, i)");
        const int64_t x = tok_b[c];
        if (par != node || x == -1) continue;
        CUDA_KERNEL_ASSERT(x >= 0 && x < V && "tree_tokens must be in [0, V) or -1");
        bool tried = false;
        for (int64_t r = 0; r < nrej; ++r) tried |= s_rejected[r] == x;
        if (tried) continue;
        const double px = static_cast<double>(p[x]);
        if (static_cast<double>(u_b[used++]) * mass < px) {
          child = c;
          break;
        }
        mass -= px;
        s_rejected[nrej++] = x;
      }
      s_mass = mass;
      s_child = child;
      s_used = used;
      s_nrej = nrej;
    }
    __syncthreads();
    const int64_t child = s_child;
    used = s_used;
    if (child < 0) break;
    if (tid == 0) acc_b[n] = child;
    ++n;
    node = child;
    __syncthreads();  // s_* are rewritten by the next step
  }

  // Bonus: each thread takes a contiguous segment of the vocabulary, an exclusive scan of the
  // segment sums gives its running sum at the segment start.
  const scalar_t* p = probs + (b * T + node) * V;
  const int64_t nrej = s_nrej;
  const double target = static_cast<double>(u_b[used]) * s_mass;
  const int64_t seg = (V + kSampleThreads - 1) / kSampleThreads;
  const int64_t x0 = tid * seg, x1 = x0 + seg < V ? x0 + seg : V;
  auto residual = [&](int64_t x) {
    for (int64_t r = 0; r < nrej; ++r)
      if (s_rejected[r] == x) return 0.0;
    return static_cast<double>(p[x]);
  };
  double seg_sum = 0;
  for (int64_t x = x0; x < x1; ++x) {
    const double px = residual(x);
    if (px > 0) seg_sum += px;
  }
  double cum;
  Scan(tmp.scan).ExclusiveSum(seg_sum, cum);
  int64_t first = V, last = -1;
  for (int64_t x = x0; x < x1; ++x) {
    const double px = residual(x);
    if (px > 0) {
      cum += px;
      last = x;
      if (target < cum) {
        first = x;
        break;
      }
    }
  }
  __syncthreads();  // tmp is reused
  const int64_t first_all = ReduceIdx(tmp.reduce_idx).Reduce(first, MinOp());  // thread 0
  __syncthreads();
  const int64_t last_all = ReduceIdx(tmp.reduce_idx).Reduce(last, MaxOp());
  if (tid == 0) {
    bonus[b] = first_all < V ? first_all : (last_all >= 0 ? last_all : 0);
    num_accepted[b] = n;
  }
  for (int64_t j = n + tid; j < T; j += kSampleThreads) acc_b[j] = -1;
}

// ---- compact_kv_cache ----

constexpr int kCompactThreads = 256;

// Moves element e (of the H * C elements of a cache row) along sequence b's accepted path:
// slot L + accepted[b, j] -> L + j for j < num_accepted[b], ascending, skipping j where the
// node is already in place. elem_t is an unsigned integer of the element's size: a move
// needs no arithmetic, so one instantiation per size covers every dtype.
template <typename elem_t>
__global__ void __launch_bounds__(kCompactThreads)
    compact_cache_kernel(elem_t* cache, int64_t sb, int64_t sl, int64_t sh, int64_t sc, int64_t H,
                         int64_t C, int64_t L_max, const int64_t* __restrict__ cache_lens,
                         const int64_t* __restrict__ accepted, const int64_t* __restrict__ num_accepted,
                         int64_t T) {
  const int64_t b = blockIdx.y;
  const int64_t e = blockIdx.x * static_cast<int64_t>(kCompactThreads) + threadIdx.x;
  if (e >= H * C) return;
  const int64_t L = cache_lens[b], n = num_accepted[b];
  CUDA_KERNEL_ASSERT(n >= 1 && n <= T && "num_accepted must be in [1, T]");
  CUDA_KERNEL_ASSERT(L >= 0 && L <= L_max && "cache_lens must be in [0, L_max]");
  // Not __restrict__: source and destination are the same tensor, and the loads and stores
  // of one thread must stay in program order.
  elem_t* base = cache + b * sb + (e / C) * sh + (e % C) * sc;
  const int64_t* acc_b = accepted + b * T;
  CUDA_KERNEL_ASSERT(acc_b[0] == 0 && "accepted[b, 0] must be 0 (the root)");
  for (int64_t j = 1; j < n; ++j) {  // accepted[b, 0] = 0 is the root, already in place
    const int64_t a = acc_b[j];
    CUDA_KERNEL_ASSERT(a > acc_b[j - 1] && a < T && "accepted must ascend within [0, T)");
    CUDA_KERNEL_ASSERT(L + a < L_max && "accepted slot beyond the cache");
    if (a != j) base[(L + j) * sl] = base[(L + a) * sl];
  }
}

}  // namespace
}  // namespace leanformer
