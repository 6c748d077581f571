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
//   * __dp4a, __float2int_rn and the _rn float operations (__fmul_rn, __fmaf_rn, ...).
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

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <map>
#include <mutex>

// Fiber stacks (libco's, 7 KB each in HIP-CPU) with a guard page below them: a kernel whose
// frame outgrows its stack faults at once instead of silently writing over the heap.
namespace leanformer::emu {
struct StackMaps {
  std::mutex mutex;
  std::map<void*, std::pair<void*, std::size_t>> maps;  // stack -> (mapping, its size)
};
inline StackMaps& stack_maps() {
  static StackMaps* m = new StackMaps;  // never destroyed: fibers are freed at thread exit
  return *m;
}
inline void* stack_alloc(unsigned int bytes) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t usable = (bytes + page - 1) / page * page, total = usable + page;
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, page, PROT_NONE);
  // libco puts the stack top at stack + bytes: the end of the mapping.
  void* stack = static_cast<char*>(base) + total - bytes;
  std::lock_guard<std::mutex> lock(stack_maps().mutex);
  stack_maps().maps[stack] = {base, total};
  return stack;
}
inline void stack_free(void* stack) {
  std::lock_guard<std::mutex> lock(stack_maps().mutex);
  auto it = stack_maps().maps.find(stack);
  if (it == stack_maps().maps.end()) return;
  munmap(it->second.first, it->second.second);
  stack_maps().maps.erase(it);
}
}  // namespace leanformer::emu
#define LIBCO_MALLOC(bytes) ::leanformer::emu::stack_alloc(bytes)
#define LIBCO_FREE(stack) ::leanformer::emu::stack_free(stack)

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
#include <cmath>
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
  unsigned live[kMaxBlockThreads / kWarpSize];  // per warp: its lanes that exist and have not exited
  const hip::detail::Fiber* fibers = nullptr;    // HIP-CPU's fibers of this OS thread, by thread
  std::uint64_t barriers[kMaxBlockThreads];  // __syncthreads passed, per thread
  std::uint64_t slots[2][kMaxBlockThreads];  // warp exchange slots, double buffered
  unsigned char parity[kMaxBlockThreads];    // which buffer a thread's next collective uses
  std::jmp_buf trap[kMaxBlockThreads];       // where a failed CUDA_KERNEL_ASSERT returns to
};

inline BlockState& block() {
  thread_local std::unique_ptr<BlockState> s{new BlockState};
  return *s;
}

inline void yield_to(unsigned f) { hip::detail::Fiber::yield(block().fibers[f]); }

// The lanes of thread f's warp that take part in a collective: those in `mask` that exist
// and have not exited.
inline unsigned warp_members(const BlockState& s, unsigned f, unsigned mask) {
  return mask & s.live[f / kWarpSize];
}
inline unsigned warp_members(unsigned mask) { return warp_members(block(), flat_tid(), mask); }

// One step of a warp barrier: thread f yields to the next member lane of its warp (round
// robin). Every member executes the same sequence of collectives (CUDA's rule for the *_sync
// functions), so after one step each of them has reached this collective.
inline void warp_step(const BlockState& s, unsigned f, unsigned members) {
  const unsigned w0 = f / kWarpSize * kWarpSize, lane = f - w0;
  const unsigned others = members & ~(1u << lane);
  if (others == 0) return;
  // the first member after `lane`, cyclically
  const unsigned above = others & (lane == kWarpSize - 1 ? 0u : ~0u << (lane + 1));
  const unsigned next = static_cast<unsigned>(__builtin_ctz(above ? above : others));
  hip::detail::Fiber::yield(s.fibers[w0 + next]);
}
inline void warp_step(unsigned members) { warp_step(block(), flat_tid(), members); }

// One warp collective's data exchange: every member lane publishes 8 bytes, steps once
// through the warp, then reads. The slots alternate between two buffers from one collective
// to the next: a lane that publishes for collective k + 1 cannot overwrite what a slower lane
// still reads for collective k, and collective k + 2 (the same buffer) waits for every lane to
// have reached k + 1, hence to have read k. One step per collective instead of two.
inline std::uint64_t* publish(BlockState& s, unsigned f, std::uint64_t bits) {
  std::uint64_t* buffer = s.slots[s.parity[f]];
  s.parity[f] ^= 1;
  buffer[f] = bits;
  return buffer;
}

template <class T>
inline T exchange(unsigned mask, T v, unsigned src_lane, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a type over 8 bytes");
  BlockState& s = block();
  const unsigned f = flat_tid(), w0 = f / kWarpSize * kWarpSize, lane = f - w0;
  const unsigned members = warp_members(s, f, mask);
  if (!(mask >> lane & 1u)) report(std::string(what) + ": the calling lane is not in the mask");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const std::uint64_t* buffer = publish(s, f, bits);
  warp_step(s, f, members);
  T r = v;
  if (members >> src_lane & 1u)
    std::memcpy(&r, &buffer[w0 + src_lane], sizeof(T));
  else
    report(std::string(what) + ": reads lane " + std::to_string(src_lane) +
           ", which has exited or is not in the mask (undefined on a GPU)");
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
    std::fill(s.parity, s.parity + s.n, 0);
    for (unsigned w = 0; w * kWarpSize < s.n; ++w)
      s.live[w] = s.n - w * kWarpSize >= kWarpSize ? ~0u : (1u << (s.n - w * kWarpSize)) - 1;
    s.fibers = s.n > 1 ? hip::detail::Tile::fibers().data() : nullptr;  // creates them: n fit (1024 reserved)
  }
  if (setjmp(s.trap[f]) == 0) kernel(args...);
  s.exited[f] = true;
  s.live[f / kWarpSize] &= ~(1u << (f % kWarpSize));
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
  const unsigned members = emu::warp_members(s, f, mask);
  const std::uint64_t* buffer = emu::publish(s, f, pred != 0);
  emu::warp_step(s, f, members);
  unsigned m = 0;
  for (unsigned l = 0; l < emu::kWarpSize; ++l)
    if (members >> l & 1u) m |= unsigned(buffer[w0 + l] & 1u) << l;
  return m;
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
inline int __ffs(int x) { return __ffs(static_cast<unsigned>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// The integer and rounding intrinsics HIP-CPU lacks. __dp4a: the sum of the four byte products
// plus c (signed or unsigned bytes). The IEEE round-to-nearest forms: the host's fp32
// operations (uncontracted: this build targets baseline x86-64, which has no FMA instruction
// for GCC to contract a * b + c into; std::fma is exact).
inline int __dp4a(int a, int b, int c) {
  for (int e = 0; e < 4; ++e) c += int(std::int8_t(a >> (8 * e))) * int(std::int8_t(b >> (8 * e)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int e = 0; e < 4; ++e) c += unsigned(std::uint8_t(a >> (8 * e))) * unsigned(std::uint8_t(b >> (8 * e)));
  return c;
}
// Round half to even (the default rounding mode), saturating, NaN -> 0: CUDA's cvt.rni.s32.f32.
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  const float r = std::nearbyint(x);
  if (r >= 2147483648.f) return 2147483647;
  if (r < -2147483648.f) return -2147483647 - 1;
  return static_cast<int>(r);
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

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
