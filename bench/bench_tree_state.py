"""tree_dwconv (a SLAB LM's causal depthwise conv of V along each tree node's branch, in a
tree-verification step: a tree of 19 nodes, 4 heads x 64, kernel 4) against the lag-table
gather the SLAB runner ran before it (its eager reference)."""
from __future__ import annotations

from typing import List

import torch

from bench.case import Case, bench_cases, time_case
from leanformer.ops import tree_dwconv
from leanformer.reference import tree_dwconv_reference

TREE, HEADS, HEAD_DIM, KERNEL = 19, 4, 64, 4
QUICK = {"tree": 8, "heads": 2, "head_dim": 16, "kernel": 3}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    B = 1
    T, H, D, K = ((QUICK["tree"], QUICK["heads"], QUICK["head_dim"], QUICK["kernel"]) if quick
                  else (TREE, HEADS, HEAD_DIM, KERNEL))
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    v = randn(B, T, 3, H, D)[:, :, 2]  # a view of the fused qkv, as the runner passes it
    tail, w, bias = randn(B * H, D, K - 1), randn(D, K), randn(D)
    parents = (torch.rand(T, generator=g) * torch.arange(T)).long().to(device)  # a random tree
    parents[0] = -1
    return [Case("tree_dwconv", f"B={B} tree={T} H={H} D={D} kernel={K}", "fwd",
                 lambda: tree_dwconv(v, tail, parents, w, bias),
                 {"eager_reference": lambda: tree_dwconv_reference(v, tail, parents, w, bias)})]


@bench_cases(cases)
def test_tree_state(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
