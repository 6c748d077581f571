"""N:M sparse linear against the dense F.linear of a weight of the same shape.

Shapes of the issue: weights [out, in] = [4096, 4096] and [4096, 11008], N tokens in
{1, 8, 512}, patterns 2:4 and 1:4. At N = 1 the op is a GEMV bound by reading the weight, so
the speed-up is at most the bytes saved: 2:4 reads half the values plus 2 bits of metadata
per value (1.88x less fp32 traffic), 1:4 a quarter (3.76x); the targets on the CPU are 1.4x
and 2.2x.

On a GPU (`--device cuda`, test_nm_sparse_linear_cuda), also:
- the CUTLASS 2:4 sparse tensor-core GEMM at 8192 x 8192 x 8192 (tokens x K x rows) in the
  suite's dtype (bf16 by default on CUDA) vs cuBLAS dense F.linear and vs PyTorch's
  to_sparse_semi_structured (cuSPARSELt on sm90, where its CUTLASS backend refuses 9.x).
  Targets: >= 1.5x dense and >= 1.0x cuSPARSELt.
- the decode GEMV: 4096 x 4096 and 4096 x 11008 (rows x K) weights, tokens 1 and 8, 2:4 and
  1:4, vs dense F.linear (reading the full weight).
"""
from __future__ import annotations

import itertools
import logging
from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, time_case
from leanformer.ops import nm_sparse_linear
from leanformer.sparse import NMSparseMatrix

WEIGHTS = ((4096, 4096), (4096, 11008))
TOKENS = (1, 8, 512)
PATTERNS = ((2, 4), (1, 4))
TARGETS_N1 = {(2, 4): 1.4, (1, 4): 2.2}
QUICK = {"weights": ((64, 256),), "tokens": (1, 8, 40)}

GEMM = 8192
GEMV_SHAPES = ((4096, 4096), (4096, 11008))  # (rows, K)
GEMV_TOKENS = (1, 8)
CUDA_QUICK = {"gemm": 512, "gemv_shapes": ((256, 512),)}

logger = logging.getLogger(__name__)


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


def cuda_cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    """The GPU-only cases: the CUTLASS 2:4 GEMM and the decode GEMV."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    size = CUDA_QUICK["gemm"] if quick else GEMM
    out = _gemm_cases(randn(size, size), randn(size, size), size, dtype, quick)
    for (rows, K), tokens, (n, m) in itertools.product(CUDA_QUICK["gemv_shapes"] if quick else GEMV_SHAPES,
                                                       GEMV_TOKENS, PATTERNS):
        w = randn(rows, K) * K ** -0.5
        s = NMSparseMatrix.prune(w, n, m)
        x = randn(tokens, K)
        dense = s.to_dense()
        out.append(Case("nm_sparse_gemv", f"{rows}x{K} N={tokens} {n}:{m}", "fwd",
                        lambda x=x, s=s, n=n, m=m: nm_sparse_linear(x, s.values, s.meta, n=n, m=m),
                        {"dense_linear": lambda x=x, d=dense: F.linear(x, d)}))
    return out


def _gemm_cases(w, x, size, dtype, quick):
    s = NMSparseMatrix.prune(w, 2, 4)
    dense = s.to_dense()
    baselines = {"dense_linear": lambda: F.linear(x, dense)}
    try:  # torch's own 2:4 weight (cuSPARSELt where available)
        from torch.sparse import to_sparse_semi_structured

        semi = to_sparse_semi_structured(dense)
        baselines["torch_semi_structured"] = lambda: F.linear(x, semi)
    except Exception as e:  # a missing baseline, said in the log
        logger.warning("nm_sparse_linear: to_sparse_semi_structured unavailable: %s", e)
    targets = {} if quick or dtype not in (torch.bfloat16, torch.float16) else {
        "dense_linear": 1.5, "torch_semi_structured": 1.0}
    return [Case("nm_sparse_gemm", f"{size}^3 2:4", "fwd",
                 lambda: nm_sparse_linear(x, s.values, s.meta, n=2, m=4), baselines, targets)]


@bench_cases(cases)
def test_nm_sparse_linear(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)


@bench_cases(cuda_cases, devices=("cuda",))
def test_nm_sparse_linear_cuda(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
