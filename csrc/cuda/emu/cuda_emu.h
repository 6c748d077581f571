// The CUDA device API the kernels of csrc/cuda/*_kernels.cuh use, on the CPU, over the HIP CPU
// Runtime (ROCm/HIP-CPU, third_party/hip-cpu): the emulation build (LEANFORMER_EMU) only.
//
// From HIP-CPU: the grid of blocks (run in parallel over TBB worker threads), one fiber per
// CUDA thread of a block (libco coroutines on the block's OS thread), threadIdx / blockIdx /
// blockDim / gridDim, __shared__ (thread_local: per OS thread, so per running block), dynamic
// shared memory sizing, atomics and the math functions.
//
// Ours, in namespace leanformer (so they hide HIP-CPU's global versions for the kernels, which
// live in that namespace):
//   * 32-lane warps. HIP-CPU's warp functions assume 64 lanes and make every shuffle a barrier
//     of the whole block, wrong for CUDA code (a warp that exits early, `if (tid < 32) scan`).
//     Here __shfl_*_sync, __ballot_sync and __syncwarp yield round robin among the fibers of
//     one warp only, skipping lanes outside the mask or already exited. Reading a lane that
//     has exited or is outside the mask is reported as an error (undefined on a GPU).
//   * __syncthreads: a round-robin yield through the block, as HIP-CPU's, that counts the
//     barriers of each thread and reports a block whose threads passed different numbers of
//     them (a barrier in divergent code: a hang or undefined on a GPU). Threads that have
//     exited count as arrived (sm_70 and later).
//   * launch(): runs the grid synchronously on the calling thread (HIP-CPU's own launch queues
//     it on a stream served by a thread that polls for work forever, a busy core), always in
//     fiber mode, and waits for every thread of a block before the block ends.
//   * CUDA_KERNEL_ASSERT: the failing thread stops (longjmp to its start), the others run on,
//     and launch() raises the first failure after the grid, as a GPU reports a device-side
//     assert at the next synchronization.
//   * Dynamic shared memory (LF_DYNAMIC_SHARED), filled with 0xFF bytes (NaN, -1) when a block
//     starts, so that a read before any write shows up.
//   * POD vector types (uint4, float4, ...) and __ldg: HIP-CPU's vector types are classes that
//     cannot be union members.
// HIP-CPU's flatten / simd attributes (on __global__, __device__ and its launch internals)
// are cleared: with them GCC inlines every kernel into the launch loop and clones it per
// vector ISA, which multiplies compile times (one file: 130 s -> 21 s without).
//
// What this cannot show: timing, occupancy, tensor cores, the memory model (a block runs on
// one OS thread and its threads interleave only at barriers and warp collectives, so a race
// between them that a barrier does not order stays hidden), and real lockstep execution.
#pragma once

#if !defined(LEANFORMER_EMU)
#error "cuda_emu.h is the CUDA emulation (LEANFORMER_EMU builds only)"
#endif

// HIP-CPU's defines first, to clear the attributes that cost compile time (hip_defines.h has
// #pragma once, so the rest of HIP-CPU does not redefine them).
#include <hip/hip_defines.h>
#undef __global__
#undef __device__
#undef __forceinline__
#undef __HIP_TILE_FUNCTION__
#undef __HIP_FLATTENED_FUNCTION__
#undef __HIP_VECTORISED_LOOP__
#define __global__
#define __device__
#define __forceinline__ inline
#define __HIP_TILE_FUNCTION__
#define __HIP_FLATTENED_FUNCTION__
#define __HIP_VECTORISED_LOOP__
#include <hip/hip_runtime.h>

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

using cudaStream_t = hipStream_t;

#ifndef __align__
#define __align__(n) alignas(n)
#endif

namespace leanformer {
namespace emu {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;

// ---- errors: the first one of a launch is raised by launch() after the grid ----

inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::string& first_error() {
  static std::string e;
  return e;
}
inline std::atomic<bool>& has_error() {
  static std::atomic<bool> e{false};
  return e;
}

inline unsigned flat_tid() { return id(hip::detail::Fiber::this_fiber()); }
inline unsigned block_threads() { return count(dimensions(hip::detail::Tile::this_tile())); }

inline void report(const std::string& what) {
  const auto& b = index(hip::detail::Tile::this_tile());
  const std::string where = " [block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
                            std::to_string(b.z) + "), thread " + std::to_string(flat_tid()) + "]";
  std::lock_guard<std::mutex> lock(error_mutex());
  if (!has_error().load()) {
    first_error() = what + where;
    has_error() = true;
  }
}

// ---- the state of the block running on this OS thread ----

struct BlockState {
  unsigned n = 0;                          // threads of the block
  unsigned done = 0;                       // threads that have returned
  bool released = false;                   // thread 0 saw every thread return: end the block
  bool exited[kMaxBlockThreads];
  std::uint64_t barriers[kMaxBlockThreads];  // __syncthreads passed, per thread
  std::uint64_t slots[kMaxBlockThreads];     // warp exchange slots
  std::jmp_buf trap[kMaxBlockThreads];       // where a failed CUDA_KERNEL_ASSERT returns to
};

inline BlockState& block() {
  thread_local std::unique_ptr<BlockState> s{new BlockState};
  return *s;
}

inline void yield_to(unsigned f) {
  hip::detail::this_tile::has_barrier = true;
  hip::detail::Fiber::yield(hip::detail::Tile::fibers()[f]);
}

// Statistics: context switches of warp collectives (for the docs' cost figures).
inline std::atomic<std::uint64_t>& warp_switches() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

// The lanes of this thread's warp that take part in a collective: those in `mask` that exist
// and have not exited.
inline unsigned warp_members(unsigned mask) {
  const BlockState& s = block();
  const unsigned f = flat_tid(), w0 = f / kWarpSize * kWarpSize;
  const unsigned wn = std::min(kWarpSize, s.n - w0);
  unsigned m = 0;
  for (unsigned l = 0; l < wn; ++l)
    if ((mask >> l & 1u) && !s.exited[w0 + l]) m |= 1u << l;
  return m;
}

// One step of a warp barrier: yield to the next member lane of this warp (round robin). Every
// member executes the same sequence of collectives (CUDA's rule for the *_sync functions), so
// after one step each of them has reached this collective.
inline void warp_step(unsigned members) {
  const unsigned f = flat_tid(), w0 = f / kWarpSize * kWarpSize, lane = f - w0;
  if ((members & ~(1u << lane)) == 0) return;
  unsigned next = lane;
  do next = (next + 1) % kWarpSize;
  while (!(members >> next & 1u));
  warp_switches().fetch_add(1, std::memory_order_relaxed);
  yield_to(w0 + next);
}

template <class T>
inline T exchange(unsigned mask, T v, unsigned src_lane, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a type over 8 bytes");
  BlockState& s = block();
  const unsigned f = flat_tid(), w0 = f / kWarpSize * kWarpSize, lane = f - w0;
  const unsigned members = warp_members(mask);
  if (!(mask >> lane & 1u)) report(std::string(what) + ": the calling lane is not in the mask");
  std::memcpy(&s.slots[f], &v, sizeof(T));
  warp_step(members);
  T r = v;
  if (members >> src_lane & 1u)
    std::memcpy(&r, &s.slots[w0 + src_lane], sizeof(T));
  else
    report(std::string(what) + ": reads lane " + std::to_string(src_lane) +
           ", which has exited or is not in the mask (undefined on a GPU)");
  warp_step(members);  // nobody overwrites a slot before every lane has read it
  return r;
}

inline unsigned lane_id() { return flat_tid() % kWarpSize; }

// ---- block barrier ----

inline void syncthreads() {
  BlockState& s = block();
  const unsigned f = flat_tid();
  if (s.n <= 1) return;
  ++s.barriers[f];
  yield_to((f + 1) % s.n);
  // The lowest live thread checks, once the whole ring has run one segment, that every live
  // thread stopped at the same barrier.
  unsigned low = 0;
  while (low < s.n && s.exited[low]) ++low;
  if (f != low) return;
  for (unsigned j = 0; j < s.n; ++j) {
    if (!s.exited[j] && s.barriers[j] != s.barriers[f]) {
      report("__syncthreads in divergent code: thread " + std::to_string(j) + " is at its barrier " +
             std::to_string(s.barriers[j]) + ", thread " + std::to_string(f) + " at " +
             std::to_string(s.barriers[f]) + " (a hang or undefined on a GPU)");
      break;
    }
  }
}

// ---- device asserts ----

[[noreturn]] inline void assert_fail(const char* cond, const char* file, int line) {
  report(std::string("device-side assert triggered: ") + cond + " (" + file + ":" + std::to_string(line) + ")");
  std::longjmp(block().trap[flat_tid()], 1);
}

// ---- dynamic shared memory ----

template <class T>
inline T* dynamic_shared(std::vector<std::byte>& storage) {
  const std::size_t bytes = scratchpad_size(domain(hip::detail::Tile::this_tile()));
  if (storage.size() < bytes) storage.resize(bytes);
  if (flat_tid() == 0 && bytes > 0) std::memset(storage.data(), 0xFF, bytes);  // first thread of the block
  return reinterpret_cast<T*>(storage.data());
}

// ---- launch ----

// The body every CUDA thread (fiber) runs: the kernel, then, once it has returned, a wait
// that keeps passing the block's barriers (exited threads count as arrived) until every
// thread has returned. Thread 0 ends the block: it returns first, then HIP-CPU's fibers
// return in order 1, 2, ..., n - 1 and hand back to it.
template <class K, class... Args>
inline void run_thread(K kernel, Args&... args) noexcept {
  hip::detail::this_tile::has_barrier = true;  // fiber mode even if thread 0 never syncs
  BlockState& s = block();
  const unsigned f = flat_tid();
  if (f == 0) {  // thread 0 always starts a block
    s.n = block_threads();
    s.done = 0;
    s.released = false;
    std::fill(s.exited, s.exited + s.n, false);
    std::fill(s.barriers, s.barriers + s.n, 0);
  }
  if (setjmp(s.trap[f]) == 0) kernel(args...);
  s.exited[f] = true;
  ++s.done;
  if (s.n <= 1) return;
  if (f == 0) {
    while (s.done < s.n) yield_to(1);
    s.released = true;
  } else {
    while (!s.released) yield_to((f + 1) % s.n);
  }
}

[[noreturn]] inline void raise_launch_error(const std::string& what) {
  TORCH_CHECK(false, "CUDA emulation: ", what);
}

// kernel<<<grid, block, smem>>>(args...), synchronously: returns when every block has run,
// and raises the first device-side error (assert, divergent barrier, bad shuffle).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, std::size_t smem, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  if (count(grid) == 0 || count(block_dim) == 0) return;
  if (count(block_dim) > kMaxBlockThreads) {
    raise_launch_error("invalid configuration: " + std::to_string(count(block_dim)) + " threads per block");
  }
  auto params = std::make_tuple(static_cast<Params>(args)...);
  auto fn = [kernel](auto&... xs) noexcept { run_thread(kernel, xs...); };
  struct Body {
    decltype(fn)* fn_;
    decltype(params)* params_;
    void operator()() const noexcept { std::apply(*fn_, *params_); }
  } body{&fn, &params};
  hip::detail::Tiled_domain domain{block_dim, grid, static_cast<std::uint32_t>(smem), body};
  for_each_tile(domain, fn, params);
  if (has_error().load()) {
    std::string what;
    {
      std::lock_guard<std::mutex> lock(error_mutex());
      what = first_error();
      has_error() = false;
    }
    raise_launch_error(what);
  }
}

}  // namespace emu

// ---- the CUDA names the kernels use, hiding HIP-CPU's (namespace leanformer) ----

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_step(emu::warp_members(mask)); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const unsigned l = emu::lane_id();
  return emu::exchange(mask, v, (l & ~unsigned(width - 1)) | (unsigned(src_lane) & (width - 1)), "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned l = emu::lane_id();
  return emu::exchange(mask, v, (l & ~unsigned(width - 1)) | ((l ^ unsigned(lane_mask)) & (width - 1)),
                       "__shfl_xor_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned l = emu::lane_id(), sub = l & (width - 1);
  return emu::exchange(mask, v, sub >= delta ? l - delta : l, "__shfl_up_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned l = emu::lane_id(), sub = l & (width - 1);
  return emu::exchange(mask, v, sub + delta < unsigned(width) ? l + delta : l, "__shfl_down_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::BlockState& s = emu::block();
  const unsigned f = emu::flat_tid(), w0 = f / emu::kWarpSize * emu::kWarpSize;
  const unsigned members = emu::warp_members(mask);
  s.slots[f] = pred != 0;
  emu::warp_step(members);
  unsigned m = 0;
  for (unsigned l = 0; l < emu::kWarpSize; ++l)
    if (members >> l & 1u) m |= unsigned(s.slots[w0 + l] & 1u) << l;
  emu::warp_step(members);
  return m;
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
inline int __ffs(int x) { return __ffs(static_cast<unsigned>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// POD vector types (the kernels reinterpret memory as them and put them in unions).
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };
template <class T>
inline T __ldg(const T* p) { return *p; }

}  // namespace leanformer

// Dynamic shared memory: LF_DYNAMIC_SHARED(float, xs) is `extern __shared__ float xs[]`.
#define LF_DYNAMIC_SHARED(type, name)                              \
  thread_local static std::vector<std::byte> name##_emu_storage_; \
  type* name = ::leanformer::emu::dynamic_shared<type>(name##_emu_storage_)

// operator new's 16-byte alignment covers every alignment the kernels ask for.
#define LF_DYNAMIC_SHARED_ALIGNED(type, name, align) \
  static_assert(align <= 16, "dynamic shared memory aligned to more than 16 bytes"); \
  LF_DYNAMIC_SHARED(type, name)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) ::leanformer::emu::assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)
