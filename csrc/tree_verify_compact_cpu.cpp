// KV-cache compaction after a tree verification, in place on the CPU: per sequence, the
// accepted nodes' slots L + a_j move down to L + j. Ascending j is safe in place because
// a_j >= j, so a source slot is never one already overwritten.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "grain.h"
#include "tree_verify_checks.h"

namespace leanformer {
namespace {

// Copies cache slot `from` to slot `to` of sequence b (every head): one memmove when a slot
// is contiguous ([.., H, D] dense), else a strided tensor copy.
void move_slot(at::Tensor& cache, int64_t b, int64_t from, int64_t to) {
  const int64_t H = cache.size(2), D = cache.size(3);
  if (cache.stride(3) == 1 && (cache.stride(2) == D || H == 1)) {
    char* base = static_cast<char*>(cache.data_ptr()) + b * cache.stride(0) * cache.element_size();
    const int64_t slot_bytes = cache.stride(1) * cache.element_size();
    std::memmove(base + to * slot_bytes, base + from * slot_bytes, H * D * cache.element_size());
  } else {
    cache.select(0, b).select(0, to).copy_(cache.select(0, b).select(0, from));
  }
}

void compact_kv_cache_cpu(const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                          const at::Tensor& cache_lens_in, const at::Tensor& accepted_in,
                          const at::Tensor& num_accepted_in) {
  const int64_t T = check_compact_kv_cache_inputs(k_cache_in, v_cache_in, cache_lens_in, accepted_in,
                                                  num_accepted_in);
  // Written in place: a cache or cache_lens whose elements share memory (stride 0, an expanded
  // view) cannot hold the result; refused before any slot moves, as PyTorch's in-place ops do.
  at::assert_no_internal_overlap(k_cache_in);
  at::assert_no_internal_overlap(v_cache_in);
  at::assert_no_internal_overlap(cache_lens_in);
  at::Tensor k_cache = k_cache_in, v_cache = v_cache_in, cache_lens = cache_lens_in;
  const at::Tensor accepted = accepted_in.contiguous(), num_accepted = num_accepted_in.contiguous();
  const int64_t B = k_cache.size(0), L_max = k_cache.size(1);
  const int64_t* acc = accepted.const_data_ptr<int64_t>();
  const int64_t* num = num_accepted.const_data_ptr<int64_t>();
  const int64_t* lens = cache_lens.const_data_ptr<int64_t>();
  const int64_t lens_stride = cache_lens.stride(0);
  // Check every sequence before moving anything, so a bad input leaves the cache untouched.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b * lens_stride];
    check_cache_len(len, b, L_max);
    check_accepted_path(acc + b * T, num[b], T, b, len, L_max);
  }
  // per sequence on average: its accepted slots (beyond the root) read and written, in both caches
  int64_t moved = 0;
  for (int64_t b = 0; b < B; ++b) moved += std::max<int64_t>(num[b] - 1, 0);
  const double slot_bytes = 2.0 * 2 * k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  const double seq_ns = work_ns(0, slot_bytes * moved / std::max<int64_t>(B, 1));
  parallel_for(0, B, parallel_grain(seq_ns), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b * lens_stride];
      for (int64_t j = 1; j < num[b]; ++j) {
        const int64_t a = acc[b * T + j];
        if (a == j) continue;
        move_slot(k_cache, b, len + a, len + j);
        move_slot(v_cache, b, len + a, len + j);
      }
    }
  });
  cache_lens.add_(num_accepted_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) { m.impl("compact_kv_cache", &compact_kv_cache_cpu); }

}  // namespace leanformer
