"""GPU cases of the tree-decoding ops, at the sizes a GPU decodes at (bench/tree_attention.py
holds the shapes of the issue, which run on every device).

- tree_attention at prefix 2048 / 8192, tree 64, head dim 128, Hq = 32, Hkv = 8 (GQA), batch
  1 and 8 (different lengths per sequence) vs F.scaled_dot_product_attention over the cache
  with the additive [B, 1, T, L_max + T] mask built for the step, and with it prebuilt;
- verify_tree_greedy / verify_tree_sampling at V = 32000, T = 64 vs the same walk written with
  torch ops (argmax of every node, then a Python walk over tensors on the device: a sync per
  step, what a user without the op writes);
- compact_kv_cache vs an index gather + copy of the accepted slots.
CPU: no cases (returns []). Run on a GPU with `python -m bench.tree_attention_cuda`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch

from bench.harness import Case
from bench.tree_attention import _dense_mask, _sdpa_step, _tree_mask
from leanformer.ops import compact_kv_cache, tree_attention, verify_tree_greedy, verify_tree_sampling

HEAD_DIM, TREE, HQ, HKV, VOCAB = 128, 64, 32, 8, 32_000
QUICK = {"prefixes": (256,), "batches": (1, 2), "tree": 8, "vocab": 1000}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if device != "cuda":
        return []
    g = torch.Generator().manual_seed(0)
    prefixes, batches = (QUICK["prefixes"], QUICK["batches"]) if quick else ((2048, 8192), (1, 8))
    T = QUICK["tree"] if quick else TREE
    V = QUICK["vocab"] if quick else VOCAB
    out = []
    for prefix in prefixes:
        for B in batches:
            out.append(_attention_case(g, dtype, B, prefix, T))
    out += _verify_cases(g, dtype, 8, T, V)
    out.append(_compact_case(g, dtype, 8, max(prefixes), T))
    return out


def _attention_case(g, dtype, B, prefix, T):
    randn = lambda *s: torch.randn(*s, generator=g).to(device="cuda", dtype=dtype)
    lens = [prefix - (b * prefix) // (2 * B) for b in range(B)]  # different lengths per sequence
    L_max = prefix + T
    cache_k, cache_v = randn(B, L_max, HKV, HEAD_DIM), randn(B, L_max, HKV, HEAD_DIM)
    k_tree, v_tree = randn(B, T, HKV, HEAD_DIM), randn(B, T, HKV, HEAD_DIM)
    for b, L in enumerate(lens):  # the tree's K/V follow each prefix, as a decoder writes them
        cache_k[b, L:L + T], cache_v[b, L:L + T] = k_tree[b], v_tree[b]
    cache_lens = torch.tensor(lens, device="cuda")
    q = randn(B, T, HQ, HEAD_DIM)
    tree_mask = _tree_mask(T, g, "cuda")
    prebuilt = _dense_mask(cache_lens, tree_mask, L_max, dtype)
    return Case(
        "tree_attention_cuda", f"B={B} prefix<={prefix} tree={T} Hq={HQ} Hkv={HKV} D={HEAD_DIM}", "fwd",
        lambda: tree_attention(q, cache_k, cache_v, cache_lens, k_tree, v_tree, tree_mask),
        {"sdpa_additive_mask": lambda: _sdpa_step(q, cache_k, cache_v,
                                                  _dense_mask(cache_lens, tree_mask, L_max, dtype)),
         "sdpa_prebuilt_mask": lambda: _sdpa_step(q, cache_k, cache_v, prebuilt)})


def _torch_walk(logits, tokens, parents):
    """Greedy verification in torch ops: argmax of every node, then the walk (syncs per step)."""
    best = logits.argmax(-1)
    B, T = tokens.shape
    out = []
    for b in range(B):
        node, path = 0, [0]
        while True:
            hit = ((parents == node) & (tokens[b] == best[b, node])).nonzero()
            if hit.numel() == 0:
                break
            node = int(hit[0, 0])
            path.append(node)
        out.append(path)
    return out


def _verify_cases(g, dtype, B, T, V):
    parents = (torch.rand(T, generator=g) * torch.arange(T)).long()
    parents[0] = -1
    tokens = torch.randint(0, V, (B, T), generator=g)
    logits = torch.randn(B, T, V, generator=g)
    for i in range(1, T):  # deep paths: most nodes hold their parent's argmax
        logits[:, parents[i], tokens[:, i]] += 8.0 * (torch.rand(B, generator=g) < 0.7)
    logits, tokens, parents = logits.to("cuda", dtype), tokens.cuda(), parents.cuda()
    probs = torch.softmax(logits.float(), -1)
    uniforms = torch.rand(B, T, device="cuda")
    label = f"B={B} tree={T} V={V}"
    return [
        Case("verify_tree_greedy_cuda", label, "fwd", lambda: verify_tree_greedy(logits, tokens, parents),
             {"torch_argmax_walk": lambda: _torch_walk(logits, tokens, parents)}),
        Case("verify_tree_sampling_cuda", label, "fwd",
             lambda: torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms),
             {"warp_then_kernel": lambda: verify_tree_sampling(logits, tokens, parents, temperature=1.0)}),
    ]


def _compact_case(g, dtype, B, prefix, T):
    L_max = prefix + T
    k = torch.randn(B, L_max, HKV, HEAD_DIM, generator=g).to("cuda", dtype)
    v = torch.randn(B, L_max, HKV, HEAD_DIM, generator=g).to("cuda", dtype)
    lens = torch.full((B,), prefix // 2, device="cuda")
    path = [a for a in (0, 1, 5, 9, 20, 40) if a < T]  # a typical accepted path
    n = len(path)
    accepted = torch.full((B, T), -1, device="cuda")
    accepted[:, :n] = torch.tensor(path, device="cuda")
    num = torch.full((B,), n, device="cuda")

    def ours():
        compact_kv_cache(k, v, lens, accepted, num)
        lens.sub_(num)  # keep the step repeatable

    def gather_copy():
        src = lens[:, None] + accepted[:, :n]                   # [B, n] slots to keep
        dst = lens[:, None] + torch.arange(n, device="cuda")
        rows = torch.arange(B, device="cuda")[:, None]
        k[rows, dst], v[rows, dst] = k[rows, src], v[rows, src]

    return Case("compact_kv_cache_cuda", f"B={B} L_max={L_max} accepted={n} Hkv={HKV} D={HEAD_DIM}", "step",
                ours, {"index_gather_copy": gather_copy})


def main(argv=None) -> int:
    """The GPU cases alone, with the suite's timing and report (bench/run.py's SUITES list runs
    bench/tree_attention.py; this file is run by bench/gpu_check.sh)."""
    from bench.harness import format_table, run_case, speedups, write_results
    from bench.run import REPO

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    min_run_time = 0.05 if args.quick else 0.5
    all_cases = cases("cuda", dtype, quick=args.quick)
    timings = [t for c in all_cases for t in run_case(c, min_run_time)]
    rows = speedups(all_cases, timings)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cuda-tree{'-quick' if args.quick else ''}")
    write_results(stem, "cuda", REPO, timings, rows, {"dtype": args.dtype, "quick": args.quick,
                                                      "min_run_time_s": min_run_time})
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
