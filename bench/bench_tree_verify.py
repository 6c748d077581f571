"""Tree verification on the GPU (CUDA-only cases: they skip on another device), at the sizes a
GPU decodes at: a batch of 8, a tree of 64 nodes, V = 32000, 8 KV heads of 128.

- verify_tree_greedy / verify_tree_sampling vs the same walk written with torch ops (argmax
  of every node, then a Python walk over tensors on the device: a sync per step, what a user
  without the op writes) and vs warping the logits before the sampling kernel;
- compact_kv_cache vs an index gather + copy of the accepted slots.
"""
from __future__ import annotations

from typing import List

import torch

from bench.case import Case, bench_cases, time_case
from leanformer.decoding import warp_probs
from leanformer.ops import compact_kv_cache, verify_tree_greedy, verify_tree_sampling

BATCH, PREFIX, HEAD_DIM, TREE, HKV, VOCAB = 8, 8192, 128, 64, 8, 32_000
QUICK = {"prefix": 256, "tree": 8, "vocab": 1000}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    T = QUICK["tree"] if quick else TREE
    V = QUICK["vocab"] if quick else VOCAB
    prefix = QUICK["prefix"] if quick else PREFIX
    return [*_verify_cases(g, dtype, BATCH, T, V), _compact_case(g, dtype, BATCH, prefix, T)]


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
        Case("verify_tree_greedy", label, "fwd", lambda: verify_tree_greedy(logits, tokens, parents),
             {"torch_argmax_walk": lambda: _torch_walk(logits, tokens, parents)}),
        Case("verify_tree_sampling", label, "fwd",
             lambda: torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms),
             {"warp_then_kernel": lambda: verify_tree_sampling(warp_probs(logits), tokens, parents)}),
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

    return Case("compact_kv_cache", f"B={B} L_max={L_max} accepted={n} Hkv={HKV} D={HEAD_DIM}", "step",
                ours, {"index_gather_copy": gather_copy})


@bench_cases(cases, devices=("cuda",))
def test_tree_verify(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
