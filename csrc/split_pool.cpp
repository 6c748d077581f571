// split_run's pool of spinning helper threads (see split_pool.h for why and how).
#include "split_pool.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace leanformer {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// How long a helper spins for the next job before it sleeps: a decoding step's GEMVs come
// 10-100 us apart, tokens a few hundred us apart. LEANFORMER_SPIN_US overrides.
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* e = std::getenv("LEANFORMER_SPIN_US");
    return e ? std::max<int64_t>(0, std::atoll(e)) * 1000 : int64_t(2000000);
  }();
  return ns;
}

// A chunk's state: free, then the caller's, or a helper's (working, committing its scratch into
// the output, done), or taken back by the caller from a helper that had it.
enum : int32_t { kFree, kCaller, kWorking, kCommitting, kDone, kTakenBack };

// The calling thread's floating-point mode (flush-to-zero / denormals-are-zero: torch.set_flush_denormal
// sets them per thread), which a helper takes on for the job's chunks: a chunk's bits then do not
// depend on the thread that computed it.
uint32_t fp_mode() {
#if defined(__x86_64__) || defined(__i386__)
  return _mm_getcsr();
#else
  return 0;
#endif
}
void set_fp_mode(uint32_t mode) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(mode);
#else
  (void)mode;
#endif
}

struct Running {
  std::shared_ptr<SplitJob> job;
  int64_t n = 0;
  int helpers = 0;  // helpers with index < helpers take part
  uint32_t fp_mode = 0;
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int32_t>[]> state;
};

std::atomic<int64_t> g_jobs{0}, g_helper_chunks{0}, g_taken_back{0};

class Pool {
 public:
  void ensure(int helpers) {
    if (started_.load(std::memory_order_acquire) >= helpers) return;
    std::lock_guard<std::mutex> lk(start_m_);
    for (int i = started_.load(); i < helpers; ++i) {
      std::thread([this, i] { helper_main(i); }).detach();
      started_.store(i + 1, std::memory_order_release);
    }
  }

  void publish(const std::shared_ptr<Running>& r) {
    {
      std::lock_guard<std::mutex> lk(pub_m_);
      current_ = r;
    }
    seq_.fetch_add(1);  // seq_cst: a helper going to sleep either sees it or is counted in sleepers_
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(sleep_m_);
      cv_.notify_all();
    }
  }

  // Drops the pool's hold on r (the helpers still in it keep their own).
  void retire(const std::shared_ptr<Running>& r) {
    std::lock_guard<std::mutex> lk(pub_m_);
    if (current_ == r) current_.reset();
  }

 private:
  void helper_main(int index) {
#ifdef __linux__
    pthread_setname_np(pthread_self(), "leanformer-split");
#endif
    std::vector<float> scratch;
    uint64_t seen = seq_.load();
    for (;;) {
      int64_t t0 = now_ns();
      for (uint32_t spins = 1; seq_.load(std::memory_order_acquire) == seen; ++spins) {
        cpu_relax();
        if (spins % 64 != 0) continue;
        if (now_ns() - t0 > spin_ns()) {
          std::unique_lock<std::mutex> lk(sleep_m_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return seq_.load() != seen; });
          sleepers_.fetch_sub(1);
          t0 = now_ns();
        } else if (spins % 1024 == 0) {
          sched_yield();  // where this core is shared with a runnable thread, let it run
        }
      }
      seen = seq_.load();
      std::shared_ptr<Running> r;
      {
        std::lock_guard<std::mutex> lk(pub_m_);
        r = current_;
      }
      if (r && index < r->helpers) work(*r, scratch);
    }
  }

  static void work(Running& r, std::vector<float>& scratch) {
    const SplitJob& j = *r.job;
    const uint32_t own_mode = fp_mode();
    set_fp_mode(r.fp_mode);
    for (;;) {
      const int64_t c = r.next.fetch_add(1);
      if (c >= r.n) break;
      int32_t s = kFree;
      if (!r.state[c].compare_exchange_strong(s, kWorking)) continue;  // taken back already
      const int64_t c0 = c * j.chunk_cols, w = std::min(j.chunk_cols, j.cols - c0);
      try {
        scratch.resize(size_t(j.rows * w));
        j.run(c, scratch.data(), w, true);
      } catch (...) {
        break;  // the chunk stays kWorking: the caller takes it back (and meets the error itself)
      }
      s = kWorking;
      if (!r.state[c].compare_exchange_strong(s, kCommitting)) continue;  // taken back meanwhile
      for (int64_t row = 0; row < j.rows; ++row)
        std::memcpy(j.out + row * j.ld + c0, scratch.data() + row * w, size_t(w) * sizeof(float));
      g_helper_chunks.fetch_add(1, std::memory_order_relaxed);  // counted before the caller can return
      r.state[c].store(kDone, std::memory_order_release);
    }
    set_fp_mode(own_mode);
  }

  std::atomic<int> started_{0};
  std::mutex start_m_, pub_m_, sleep_m_;
  std::condition_variable cv_;
  std::shared_ptr<Running> current_;
  std::atomic<uint64_t> seq_{0};
  std::atomic<int> sleepers_{0};
};

// Leaked on purpose: detached helpers may run until the process ends. A forked child has no
// helpers (only the forking thread survives a fork): it starts a fresh pool.
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
    return true;
  }();
  (void)registered;
  Pool* p = g_pool.load();
  if (p == nullptr) {
    static std::mutex m;
    std::lock_guard<std::mutex> lk(m);
    p = g_pool.load();
    if (p == nullptr) g_pool.store(p = new Pool());
  }
  return *p;
}

}  // namespace

int split_helpers() {
  if (at::in_parallel_region()) return 0;
  static const int hw = std::max(1, int(std::thread::hardware_concurrency()));
  return std::max(0, std::min(at::get_num_threads(), hw) - 1);
}

int64_t split_units_per_chunk(int64_t units) {
  const int64_t chunks = 8 * (1 + int64_t(split_helpers()));
  return std::max<int64_t>(1, (units + chunks - 1) / chunks);
}

std::shared_ptr<SplitJob> make_split_job(int64_t rows, int64_t cols, int64_t units_per_chunk, int64_t unit_cols,
                                         float* out, std::function<void(int64_t, float*, int64_t, bool)> run) {
  auto job = std::make_shared<SplitJob>();
  job->rows = rows;
  job->cols = cols;
  job->chunk_cols = units_per_chunk * unit_cols;
  job->out = out;
  job->ld = cols;
  job->run = std::move(run);
  return job;
}

void split_run(const std::shared_ptr<SplitJob>& job) {
  const SplitJob& j = *job;
  const int64_t n = j.chunks();
  if (n == 0 || j.rows == 0) return;
  g_jobs.fetch_add(1, std::memory_order_relaxed);
  const int helpers = n > 1 ? split_helpers() : 0;
  if (helpers == 0) {
    for (int64_t c = 0; c < n; ++c) j.run(c, j.out + c * j.chunk_cols, j.ld, false);
    return;
  }
  Pool& p = pool();
  p.ensure(helpers);
  auto r = std::make_shared<Running>();
  r->job = job;
  r->n = n;
  r->helpers = helpers;
  r->fp_mode = fp_mode();
  r->state.reset(new std::atomic<int32_t>[size_t(n)]);
  for (int64_t c = 0; c < n; ++c) r->state[c].store(kFree, std::memory_order_relaxed);
  p.publish(r);
  // Whatever happens below (a chunk throws), no helper writes the output once this returns: every
  // chunk is the caller's, taken back, or done.
  struct Settle {
    Pool& p;
    const std::shared_ptr<Running>& r;
    bool armed = true;
    ~Settle() {
      if (!armed) return;
      for (int64_t c = 0; c < r->n; ++c) {
        for (uint32_t spins = 1;; ++spins) {
          int32_t s = r->state[c].load(std::memory_order_acquire);
          if (s == kCaller || s == kDone || s == kTakenBack) break;
          if ((s == kFree || s == kWorking) && r->state[c].compare_exchange_strong(s, kTakenBack)) break;
          if (spins % 1024 == 0) sched_yield();
          cpu_relax();
        }
      }
      p.retire(r);
    }
  } settle{p, r};

  const int64_t t0 = now_ns();
  int64_t mine = 0;
  for (int64_t c; (c = r->next.fetch_add(1)) < n; ++mine) {
    r->state[c].store(kCaller, std::memory_order_relaxed);
    j.run(c, j.out + c * j.chunk_cols, j.ld, false);
  }
  // The helpers' chunks: done, or taken back once they have had twice the caller's time per chunk.
  // A helper committing a chunk (copying it in) is waited for; after ~1000 spins the caller yields,
  // in case that helper waits for this core.
  const int64_t waiting_since = now_ns();
  const int64_t patience = std::max<int64_t>(2 * (waiting_since - t0) / std::max<int64_t>(mine, 1), 5000);
  for (int64_t c = 0; c < n; ++c) {
    for (uint32_t spins = 1;; ++spins) {
      int32_t s = r->state[c].load(std::memory_order_acquire);
      if (s == kCaller || s == kDone) break;
      if ((s == kFree || s == kWorking) && now_ns() - waiting_since > patience) {
        if (r->state[c].compare_exchange_strong(s, kTakenBack)) {
          g_taken_back.fetch_add(1, std::memory_order_relaxed);
          j.run(c, j.out + c * j.chunk_cols, j.ld, false);
          break;
        }
        continue;  // the helper is committing it: it will be done in a moment
      }
      if (spins % 1024 == 0) sched_yield();
      cpu_relax();
    }
  }
  settle.armed = false;
  p.retire(r);
}

SplitStats split_stats() {
  return {g_jobs.load(), g_helper_chunks.load(), g_taken_back.load()};
}

namespace {
constexpr int64_t kRows = 3, kChunkCols = 5;  // split_selftest's output
}  // namespace

bool split_selftest(int64_t chunks, int64_t chunk_us, int64_t delay_us, double* seconds, int64_t throw_at) {
  if (chunks < 1 || chunk_us < 0 || delay_us < 0) return false;
  const int64_t cols = chunks * kChunkCols - 2;  // a shorter last chunk
  std::vector<float> out(size_t(kRows * cols), -1.f);
  auto job = std::make_shared<SplitJob>();
  job->rows = kRows;
  job->cols = cols;
  job->chunk_cols = kChunkCols;
  job->out = out.data();
  job->ld = cols;
  job->run = [cols, chunk_us, delay_us, throw_at](int64_t c, float* dst, int64_t ld, bool helper) {
    if (helper && delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    if (!helper && c == throw_at) throw std::runtime_error("split_selftest: chunk " + std::to_string(c) + " failed");
    for (const int64_t t0 = now_ns(); now_ns() - t0 < chunk_us * 1000;) cpu_relax();
    const int64_t c0 = c * kChunkCols, w = std::min(kChunkCols, cols - c0);
    for (int64_t row = 0; row < kRows; ++row)
      for (int64_t k = 0; k < w; ++k) dst[row * ld + k] = float(row * 100000 + c0 + k);
  };
  const int64_t t0 = now_ns();
  split_run(job);
  *seconds = double(now_ns() - t0) * 1e-9;
  for (int64_t row = 0; row < kRows; ++row)
    for (int64_t k = 0; k < cols; ++k)
      if (out[size_t(row * cols + k)] != float(row * 100000 + k)) return false;
  return true;
}

}  // namespace leanformer
