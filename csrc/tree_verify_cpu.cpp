// Verification of a drafted token tree on the CPU, one sequence per task: greedy (follow the
// child holding the argmax token) and lossless sampling (the EAGLE rule for deterministic
// drafts). Only the logits/probs rows on the accepted path are read, so the cost is the
// path length times V, not T times V.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "grain.h"
#include "tree_verify_checks.h"

namespace leanformer {
namespace {

// The children of every node in index order as linked lists, -1 tokens left out (parents and
// tokens already checked).
struct Children {
  std::vector<int64_t> first, next;

  Children(const int64_t* parents, const int64_t* tokens, int64_t T)
      : first(T, -1), next(T, -1) {
    for (int64_t i = T - 1; i >= 1; --i) {
      if (tokens[i] == -1) continue;
      next[i] = first[parents[i]];
      first[parents[i]] = i;
    }
  }
};

using Verification = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Runs walk(b, children, path) -> bonus for every sequence in parallel and packs the results.
template <typename Walk>
Verification verify_each(const TreeVerifyShape& s, const at::Tensor& tree_tokens_in,
                         const at::Tensor& parents_in, const Walk& walk) {
  const at::Tensor tokens = tree_tokens_in.contiguous(), parents = parents_in.contiguous();
  const auto opts = tokens.options();
  at::Tensor accepted = at::full({s.B, s.T}, -1, opts);
  at::Tensor num_accepted = at::empty({s.B}, opts), bonus = at::empty({s.B}, opts);
  int64_t* acc = accepted.data_ptr<int64_t>();
  int64_t* num = num_accepted.data_ptr<int64_t>();
  int64_t* bon = bonus.data_ptr<int64_t>();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const int64_t* par = parents.const_data_ptr<int64_t>();
  // Checked serially before any work, so the error names the first bad sequence, not whichever
  // thread threw first, and nothing is half written.
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t* par_b = par + (s.batched_parents ? b * s.T : 0);
    for (int64_t i = 0; i < s.T; ++i) {
      check_parent(par_b[i], b, i);
      check_tree_token(tok[b * s.T + i], b, i, s.V);
    }
  }
  // a sequence scans at least its root's V logits (deeper accepted paths scan more)
  parallel_for(0, s.B, parallel_grain(work_ns(0, 0, double(s.V))), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* tok_b = tok + b * s.T;
      const Children kids(par + (s.batched_parents ? b * s.T : 0), tok_b, s.T);
      int64_t* path = acc + b * s.T;
      int64_t n = 1;
      path[0] = 0;
      bon[b] = walk(b, tok_b, kids, path, n);
      num[b] = n;
    }
  });
  return {accepted, num_accepted, bonus};
}

at::Tensor last_dim_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

Verification verify_tree_greedy_cpu(const at::Tensor& logits_in, const at::Tensor& tree_tokens,
                                    const at::Tensor& parents) {
  const TreeVerifyShape s = check_tree_verify_inputs(logits_in, "logits", tree_tokens, parents);
  const at::Tensor logits = last_dim_contiguous(logits_in);
  Verification result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "verify_tree_greedy_cpu", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    // Compared in the logits' own precision (fp16/bf16 widen to fp32 exactly; fp64 stays fp64:
    // rounding it to fp32 would tie 1 and 1 + 1e-12, or turn 1e39 and 2e39 into inf).
    using cmp_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // The first maximum, as torch.argmax; a NaN counts as the maximum (as in torch.argmax).
    auto argmax = [&](int64_t b, int64_t node) {
      const scalar_t* row = base + b * logits.stride(0) + node * logits.stride(1);
      int64_t best = 0;
      cmp_t best_v = static_cast<cmp_t>(row[0]);
      for (int64_t x = 1; x < s.V && best_v == best_v; ++x) {
        const cmp_t v = static_cast<cmp_t>(row[x]);
        if (v > best_v || v != v) best = x, best_v = v;
      }
      return best;
    };
    result = verify_each(s, tree_tokens, parents,
                         [&](int64_t b, const int64_t* tok, const Children& kids, int64_t* path, int64_t& n) {
                           for (int64_t node = 0;;) {
                             const int64_t want = argmax(b, node);
                             int64_t c = kids.first[node];
                             while (c != -1 && tok[c] != want) c = kids.next[c];
                             if (c == -1) return want;
                             path[n++] = node = c;
                           }
                         });
  });
  return result;
}

Verification verify_tree_sampling_cpu(const at::Tensor& probs_in, const at::Tensor& tree_tokens,
                                      const at::Tensor& parents, const at::Tensor& uniforms_in) {
  const TreeVerifyShape s = check_verify_tree_sampling_inputs(probs_in, tree_tokens, parents, uniforms_in);
  const at::Tensor probs = last_dim_contiguous(probs_in), uniforms = uniforms_in.contiguous();
  const float* u_base = uniforms.const_data_ptr<float>();
  const int64_t u_stride = uniforms.size(1);
  Verification result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "verify_tree_sampling_cpu", [&] {
    const scalar_t* base = probs.const_data_ptr<scalar_t>();
    result = verify_each(s, tree_tokens, parents,
                         [&](int64_t b, const int64_t* tok, const Children& kids, int64_t* path, int64_t& n) {
      const float* u = u_base + b * u_stride;
      int64_t used = 0;
      std::vector<int64_t> rejected;
      for (int64_t node = 0;;) {
        const scalar_t* p = base + b * probs.stride(0) + node * probs.stride(1);
        // mass: p's total less the rejected tokens', i.e. the normalizer of the residual.
        double mass = 0;
        for (int64_t x = 0; x < s.V; ++x) mass += static_cast<double>(p[x]);
        rejected.clear();
        int64_t accepted_child = -1;
        for (int64_t c = kids.first[node]; c != -1; c = kids.next[c]) {
          const int64_t x = tok[c];
          if (std::find(rejected.begin(), rejected.end(), x) != rejected.end()) continue;  // tried
          const double px = static_cast<double>(p[x]);
          if (static_cast<double>(u[used++]) * mass < px) {
            accepted_child = c;
            break;
          }
          mass -= px;
          rejected.push_back(x);
        }
        if (accepted_child != -1) {
          path[n++] = node = accepted_child;
          continue;
        }
        // Bonus by inverse CDF of the residual; rounding past the end picks the last token
        // with residual p > 0 (the first token if there is none).
        const double target = static_cast<double>(u[used]) * mass;
        double cum = 0;
        int64_t last = 0;
        for (int64_t x = 0; x < s.V; ++x) {
          const double px = std::find(rejected.begin(), rejected.end(), x) != rejected.end()
                                ? 0.0 : static_cast<double>(p[x]);
          if (px > 0) {
            cum += px;
            last = x;
            if (target < cum) return x;
          }
        }
        return last;
      }
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanformer, CPU, m) {
  m.impl("verify_tree_greedy", &verify_tree_greedy_cpu);
  m.impl("verify_tree_sampling", &verify_tree_sampling_cpu);
}

}  // namespace leanformer
