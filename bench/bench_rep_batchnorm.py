"""RepBN and PRepBN's progressive norm against their eager compositions
(BatchNorm1d over every token + alpha * x; LayerNorm + that + the mix)."""
from __future__ import annotations

from typing import List

import torch

from bench.case import Case, bench_cases, time_case
from leanformer.ops import progressive_norm, rep_batchnorm
from leanformer.reference import progressive_norm_reference, rep_batchnorm_reference

SHAPE = (64 * 197, 384)  # DeiT-S tokens of a batch of 64, as in the SLAB issue
QUICK = (2 * 50, 32)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    N, C = QUICK if quick else SHAPE
    x = (torch.randn(N, C, generator=g) * 2 + 1).to(device, dtype).requires_grad_(True)
    leaf = lambda t: t.to(device).requires_grad_(True)
    w, b = leaf(torch.ones(C)), leaf(torch.zeros(C))
    alpha = leaf(torch.ones(1))
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    ours = lambda: rep_batchnorm(x, w, b, alpha, rm, rv, training=True)
    eager = lambda: rep_batchnorm_reference(x, w, b, alpha, rm, rv, training=True)

    def fwd_bwd(fn):
        def run():
            fn().backward(torch.ones(N, C, dtype=dtype, device=device))
        return run

    lw, lb = leaf(torch.ones(C)), leaf(torch.zeros(C))
    pn = lambda: progressive_norm(x, lw, lb, w, b, alpha, rm, rv, 0.5, training=True)
    pn_eager = lambda: progressive_norm_reference(x, lw, lb, w, b, alpha, rm, rv, 0.5, training=True)
    label = f"{N}x{C}"
    return [Case("rep_batchnorm", label, "fwd", ours, {"eager": eager}),
            Case("rep_batchnorm", label, "fwd+bwd", fwd_bwd(ours), {"eager": fwd_bwd(eager)}),
            Case("progressive_norm", label, "fwd", pn, {"eager": pn_eager}),
            Case("progressive_norm", label, "fwd+bwd", fwd_bwd(pn), {"eager": fwd_bwd(pn_eager)},
                 {"eager": 2.0})]


@bench_cases(cases)
def test_rep_batchnorm(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
