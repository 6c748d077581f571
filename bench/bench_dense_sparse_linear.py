"""DSFormer's DenseSparseLinear against the dense nn.Linear it replaces (and against the
truncated-SVD LowRankLinear of the same storage), 4096 x 4096, at 2x and 3x compression (the
largest 2:4 rank that meets it, metadata and bias counted), N in {1, 8} tokens, inference.
At batch 1 a Linear is bound by reading its weight, so the ideal is the compression itself.
"""
from __future__ import annotations

import itertools
from typing import List

import torch
from torch import nn

from bench.case import Case, bench_cases, time_case
from leanformer.compress import dsformer_rank
from leanformer.compress.low_rank import low_rank_rank
from leanformer.nn import DenseSparseLinear, LowRankLinear

DIM = 4096
COMPRESSIONS = (2.0, 3.0)
TOKENS = (1, 8)
QUICK = {"dim": 64, "tokens": (1, 3)}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    torch.manual_seed(0)
    dim, tokens = (QUICK["dim"], QUICK["tokens"]) if quick else (DIM, TOKENS)
    dense = nn.Linear(dim, dim, device=device, dtype=dtype).eval()
    out = []
    for compression, n in itertools.product(COMPRESSIONS, tokens):
        rank = dsformer_rank(dense, compression, 2, 4)
        lr_rank = low_rank_rank(dense, compression)
        ours = DenseSparseLinear(dim, dim, rank, n=2, m=4, device=device, dtype=dtype).eval()
        svd = LowRankLinear(dim, dim, lr_rank, device=device, dtype=dtype).eval()
        x = torch.randn(n, dim, device=device, dtype=dtype)

        def run(module, x=x):
            def call():
                with torch.no_grad():
                    return module(x)
            return call

        out.append(Case("dense_sparse_linear", f"{dim}x{dim} {compression:g}x rank={rank} 2:4 N={n}", "fwd",
                        run(ours), {"dense_linear": run(dense), f"low_rank_rank{lr_rank}": run(svd)}))
    return out


@bench_cases(cases)
def test_dense_sparse_linear(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
