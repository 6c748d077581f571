"""quantized_linear (4/8-bit block-quantized weights) against dense float32 F.linear (CPU).

The issue's shapes: a 4096 x 4096 weight at 1 row (a decoding step), 8 and 64 rows (token trees),
formats q4_0, q4_1 (GGUF's) and q8_0. Each call runs its op over several copies of the weight,
more than twice the L3 in all (32 MB on the 2-core AMD host): decoding a model reads every
weight once per step from DRAM, not from a cache the previous call warmed. Targets against
F.linear at every row count: q8_0 >= 3x, q4_0 and q4_1 >= 5x.

At one row both sides are bound by the weight's bytes: dense reads 32 bits a weight, q4_1 5,
q4_0 4.5, q8_0 8.5, so the ceilings are 6.4x, 7.1x and 3.8x. At 64 rows dense F.linear (MKL)
becomes compute-bound and the quantized kernel's integer dot products (AVX-512 VNNI: 64
multiply-adds an instruction) carry it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, run_all, time_case
from leanformer.ops import quantized_linear
from leanformer.quant import FORMATS, BlockQuantizedMatrix

SIZE = 4096
ROWS = (1, 8, 64)
TARGETS = {"q4_0": 5.0, "q4_1": 5.0, "q8_0": 3.0}
# copies of each weight: q4 is ~10 MB, q8 ~17 MB, dense 64 MB: 8, 4 and 2 copies exceed 2x the L3
COPIES = {"q4_0": 8, "q4_1": 8, "q8_0": 4, "dense": 2}
QUICK = {"size": 256, "rows": (1, 8)}


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if device != "cpu" or dtype != torch.float32:
        return []  # CPU float32 (the CUDA kernel has not run on a GPU yet: tests/ops/test_quantized_linear_cuda.py)
    g = torch.Generator().manual_seed(0)
    size, rows = (QUICK["size"], QUICK["rows"]) if quick else (SIZE, ROWS)
    w = torch.randn(size, size, generator=g) * size ** -0.5
    copies = {k: 1 if quick else v for k, v in COPIES.items()}
    dense = [w.clone() for _ in range(copies["dense"])]
    out = []
    for fmt in ("q4_0", "q4_1", "q8_0"):
        bits, sym = FORMATS[fmt]
        q = BlockQuantizedMatrix.from_dense(w, bits=bits, symmetric=sym, clip_grid=(1.0,))
        qs = [q] + [BlockQuantizedMatrix(q.qweight.clone(), q.scales.clone(), None if sym else q.mins.clone(), bits,
                                         q.shape) for _ in range(copies[fmt] - 1)]
        for M in rows:
            x = torch.randn(M, size, generator=g)
            # equal work per call on both sides: each runs over its copies, scaled to the same count
            n = max(len(qs), len(dense))
            ours = [(x, qs[i % len(qs)]) for i in range(n)]
            base = [(x, dense[i % len(dense)]) for i in range(n)]
            out.append(Case(
                "quantized_linear", f"{fmt} [{M}, {size}] -> {size}, {n} weights", "fwd",
                lambda a=ours: run_all(quantized_linear, a),
                {"F.linear": lambda a=base: run_all(F.linear, a)},
                {} if quick else {"F.linear": TARGETS[fmt]}))
    return out


@bench_cases(cases)
def test_quantized_linear(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
