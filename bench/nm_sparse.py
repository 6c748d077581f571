"""N:M sparse linear against the dense F.linear of a weight of the same shape.

Shapes of the issue: weights [out, in] = [4096, 4096] and [4096, 11008], N tokens in
{1, 8, 512}, patterns 2:4 and 1:4. At N = 1 the op is a GEMV bound by reading the weight, so
the speed-up is at most the bytes saved: 2:4 reads half the values plus 2 bits of metadata
per value (1.88x less fp32 traffic), 1:4 a quarter (3.76x); the targets on the CPU are 1.4x
and 2.2x.
"""
from __future__ import annotations

import itertools
from typing import List

import torch
import torch.nn.functional as F

from bench.harness import Case
from leanformer.ops import nm_sparse_linear
from leanformer.sparse import NMSparseMatrix

WEIGHTS = ((4096, 4096), (4096, 11008))
TOKENS = (1, 8, 512)
PATTERNS = ((2, 4), (1, 4))
TARGETS_N1 = {(2, 4): 1.4, (1, 4): 2.2}
QUICK = {"weights": ((64, 256),), "tokens": (1, 8, 40)}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    weights, tokens = (QUICK["weights"], QUICK["tokens"]) if quick else (WEIGHTS, TOKENS)
    out = []
    for (rows, K), (n, m) in itertools.product(weights, PATTERNS):
        dense = (torch.randn(rows, K, generator=g) * K ** -0.5).to(device=device, dtype=dtype)
        sparse = NMSparseMatrix.prune(dense, n, m)
        for N in tokens:
            x = torch.randn(N, K, generator=g).to(device=device, dtype=dtype)
            targets = {"dense_linear": TARGETS_N1[(n, m)]} if device == "cpu" and N == 1 and not quick else {}
            out.append(Case(
                "nm_sparse_linear", f"{n}:{m} [{rows}, {K}] N={N}", "fwd",
                lambda x=x, s=sparse, n=n, m=m: nm_sparse_linear(x, s.values, s.meta, n=n, m=m),
                {"dense_linear": lambda x=x, w=dense: F.linear(x, w)}, targets))
    return out
