"""packed_linear against F.linear at decoding sizes (CPU, float32, under inference mode as
generate runs them).

Rows 1 (a plain decoding step), 19 (the experiment's token tree) and 76 (that tree at batch
4), on the tree-decoding LMs' layer shapes (256 -> 768 / 1024, 1024 -> 256). Each call runs
eight different weights in turn, 4-8 MB in all, more than the L2: in a decoding forward every
weight is read once per step, from L3, not from a cache warmed by the previous call.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, run_all, time_case
from leanformer.ops import pack_linear_weight, packed_linear

SHAPES = ((256, 768), (256, 1024), (1024, 256))  # (in, out)
ROWS = (1, 19, 76)
WEIGHTS = 8


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if device != "cpu" or dtype != torch.float32:
        return []  # a CPU float32 kernel (on CUDA, cuBLAS reads the weight as it is)
    g = torch.Generator().manual_seed(0)
    out = []
    for K, N in (SHAPES[:1] if quick else SHAPES):
        ws = [torch.randn(N, K, generator=g) * K ** -0.5 for _ in range(2 if quick else WEIGHTS)]
        bs = [torch.randn(N, generator=g) for _ in ws]
        pws = [pack_linear_weight(w) for w in ws]
        for M in ((1, 19) if quick else ROWS):
            x = torch.randn(M, K, generator=g)
            ours = [(x, pw, b, N) for pw, b in zip(pws, bs)]
            base = [(x, w, b) for w, b in zip(ws, bs)]
            out.append(Case(
                "packed_linear", f"[{M}, {K}] -> {N}, {len(ws)} weights", "fwd",
                lambda a=ours: run_all(packed_linear, a),
                {"F.linear": lambda a=base: run_all(F.linear, a)}))
    return out


@bench_cases(cases)
def test_packed_linear(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
