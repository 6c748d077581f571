// When a CPU kernel opens a parallel region: the grain of every at::parallel_for in csrc/*_cpu.cpp.
//
// An OpenMP region costs its caller the wake-up of the other workers and a barrier at its end.
// On a quiet host that is a few microseconds; on a busy one a worker the OS has descheduled
// holds the barrier until the scheduler runs it again. On the 2-core test host (AMD EPYC Zen 4,
// shared) a 0.06 ms sparse_down_projection split over both threads took 8.8 ms at load ~8
// (issue 29), and at load 3-4 from other tenants every region cost 8 ms: a 1-token topk_mlp
// (0.3-0.4 ms on one thread, 0.19 ms on two when quiet) took 8 ms per call, and 32 ms with two
// busy loops besides, where one thread held 0.3-0.5 ms; nm_sparse_linear's 2:4 GEMV on 4096 x
// 4096, 2.1 ms on one thread, took 8 ms on two. A second thread saves at most half a call on a
// quiet host (less for GEMVs streaming from memory: F.linear's 4096 x 4096 GEMV ran 3.6 ms on
// one thread or two), so a kernel splits its work only when there is a lot of it: a region opens
// only for at least kMinParallelNs of estimated single-thread work, and then every chunk gets at
// least half of that (at::parallel_for runs inline when the range is no larger than the grain,
// and otherwise uses at most ceil(range / grain) workers). Below it the op runs on the calling
// thread, which a loaded host slows only by its share of the CPU. Decoding-sized calls (one token
// through a layer's matrices) stay on one thread; prefill, training and larger GEMVs still use
// every thread, where a stall costs a fraction of the call. quantized_linear, float32
// packed_linear / packed_swiglu and float32 one-token nm_sparse_linear do not open OpenMP regions
// at all: their chunks run on split_run's spinning helpers, which a busy host cannot stall
// either (split_pool.h).
//
// Each call site estimates its cost per item from the multiply-adds and the bytes it streams
// (work_ns: whichever bounds it, compute or memory, plus scalar steps). The rates are this
// code's single-thread figures on the test host, rounded to the fast side, so that an estimate
// errs towards one thread: measured there on one thread, a 1 MB packed_linear weight (L3) in
// 25 us (estimate 33), a 0.5 MB sparse_down_projection in 14 us (16), nm_sparse_linear 2:4 on
// 1024 x 1024 in 55 us (68) and on 4096 x 4096 in 2.1 ms from memory (1.1), topk_mlp's 1-token
// up projection (16 MB) in about 0.3 ms (0.5).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

namespace leanformer {

// Estimated single-thread work below which no parallel region opens.
constexpr double kMinParallelNs = 2e6;

// ~16 vectorized fp32 multiply-adds per ns on cached operands (AVX2: 2 FMA ports x 8 lanes at
// ~3 GHz, about half of peak); ~32 GB/s streamed by one core from L3 (about 16 GB/s from
// memory); ~1 ns for a scalar step with a load and a branch (selection, decoding, scatter).
constexpr double kNsPerMac = 1.0 / 16;
constexpr double kNsPerByte = 1.0 / 32;
constexpr double kNsPerScalarStep = 1.0;

// Estimated single-thread ns of an item of work.
constexpr double work_ns(double macs, double bytes, double scalar_steps = 0) {
  return std::max(macs * kNsPerMac, bytes * kNsPerByte) + scalar_steps * kNsPerScalarStep;
}

// The at::parallel_for grain for items of ns_per_item each (work_ns): the items of
// kMinParallelNs. Items of no estimated cost never open a region.
inline int64_t parallel_grain(double ns_per_item) {
  if (!(ns_per_item > 0)) return std::numeric_limits<int64_t>::max();
  const double items = std::ceil(kMinParallelNs / ns_per_item);
  return items >= 9e18 ? std::numeric_limits<int64_t>::max() : std::max<int64_t>(1, int64_t(items));
}

// The threads worth planning tasks for (splitting columns, rows, heads) for total_ns of work:
// at::get_num_threads() from kMinParallelNs on, else 1.
inline int64_t planned_threads(double total_ns) {
  return total_ns >= kMinParallelNs ? at::get_num_threads() : 1;
}

// Chunks run inside a parallel region since the library loaded (leanformer._C.parallel_chunks(),
// so tests can check that decoding-sized calls open none).
inline std::atomic<int64_t>& parallel_chunk_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

// at::parallel_for(begin, end, grain, f), counting the chunks that ran in a parallel region.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (at::in_parallel_region()) parallel_chunk_count().fetch_add(1, std::memory_order_relaxed);
    f(b, e);
  });
}

}  // namespace leanformer
