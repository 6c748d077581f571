// A decoding step's GEMVs on every thread, without waiting on a descheduled one.
//
// One token through a quantized model is ~120 GEMVs of 10-200 us each, and its time is the
// weights' bytes over the memory bandwidth one core can pull (~10-12 GB/s on the test host, an
// AMD EPYC Zen 4 sharing 2 cores with other tenants); a second core streams the other half. An
// OpenMP region cannot give it: its workers sleep between regions (waking them costs more than
// the GEMV) and its closing barrier waits for every worker, so on a busy host one descheduled
// worker holds each call for a scheduler time slice (~8 ms a region measured there, grain.h).
//
// split_run instead runs a job's chunks (column ranges of its output, independent of one another)
// on the calling thread and on helper threads that spin between jobs (for kSpinNs, then sleep),
// each taking the next chunk from a shared counter. The caller never waits for a helper to
// start, and not long for one to finish: a helper computes its chunk into its own scratch and
// copies it into the output only if the caller has not taken the chunk back; once the caller has
// run out of chunks, it takes back (computes itself) every chunk a helper has held for longer
// than twice the caller's own time per chunk. A helper descheduled in a chunk costs a call that
// chunk twice, not a time slice (only one descheduled while copying its finished chunk in is
// waited for, the caller yielding its core meanwhile); a quiet host gets both cores. Results do
// not depend on who computed a chunk (every chunk is computed the same way, helpers in the
// caller's floating-point mode), nor on the number of threads. If a chunk throws, the error
// reaches the caller, and no helper writes the output after split_run has returned.
//
// The job's function and what it reads stay alive as long as any thread holds the job (a
// shared_ptr; the function holds its tensors' storages by value): a helper may still be in a
// chunk the caller took back after the op returned. (Resizing a storage in place, resize_ on an
// input, while an op reads it is not covered.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace leanformer {

struct SplitJob {
  int64_t rows = 0;        // the output's rows ...
  int64_t cols = 0;        // ... and columns, in chunks of chunk_cols (the last one shorter)
  int64_t chunk_cols = 0;
  float* out = nullptr;    // [rows, ld]
  int64_t ld = 0;
  // run(c, dst, ld_dst, helper): chunk c's outputs (its columns of every row) into dst (the
  // output at column c * chunk_cols, or a helper's scratch), rows ld_dst apart. helper: true on a
  // helper thread (only the tests' stand-in for a descheduled helper looks at it).
  std::function<void(int64_t, float*, int64_t, bool)> run;

  int64_t chunks() const { return cols == 0 ? 0 : (cols + chunk_cols - 1) / chunk_cols; }
};

// How many of `units` (tiles, panels) a chunk takes: about 8 chunks for each thread split_run
// would use now, so that a late helper's chunk is a small part of a call.
int64_t split_units_per_chunk(int64_t units);

// A job over the output out [rows, cols] (rows cols apart) in chunks of units_per_chunk units of
// unit_cols columns each.
std::shared_ptr<SplitJob> make_split_job(int64_t rows, int64_t cols, int64_t units_per_chunk, int64_t unit_cols,
                                         float* out, std::function<void(int64_t, float*, int64_t, bool)> run);

// The storages behind the tensors a job reads (what its function captures by value: a tensor
// object alone would not keep its data when `param.data = ...` swaps the storage).
template <typename... Ts>
std::vector<c10::Storage> storages_of(const Ts&... tensors) {
  std::vector<c10::Storage> out;
  (..., (tensors.defined() ? out.push_back(tensors.storage()) : void()));
  return out;
}

// Runs every chunk of job, on the calling thread and up to at::get_num_threads() - 1 helpers
// (none inside a parallel region, or where one thread is set); returns when all are in job.out.
void split_run(const std::shared_ptr<SplitJob>& job);

// The helpers split_run would use for a call now (0: it runs on the calling thread alone).
int split_helpers();

// Counters since loading (leanformer._C.split_stats()): jobs run, chunks helpers delivered,
// chunks the caller took back from a helper.
struct SplitStats {
  int64_t jobs, helper_chunks, taken_back;
};
SplitStats split_stats();

// The tests' check: a job of `chunks` chunks of chunk_us each (spinning), where helpers sleep
// delay_us more in every chunk (a descheduled helper's stand-in), and chunk throw_at throws on
// the caller (-1: none; the error propagates). Returns whether every output is right; *seconds:
// the call's time (leanformer._C.split_selftest).
bool split_selftest(int64_t chunks, int64_t chunk_us, int64_t delay_us, double* seconds, int64_t throw_at = -1);

}  // namespace leanformer
