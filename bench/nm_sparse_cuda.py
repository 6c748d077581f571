"""N:M sparse linear on the GPU (GPU-only suite: no cases on another device).

- CUTLASS 2:4 sparse tensor-core GEMM at 8192 x 8192 x 8192 (tokens x K x rows) in the
  suite's dtype (bf16 by default on CUDA) vs cuBLAS dense F.linear and vs PyTorch's
  to_sparse_semi_structured (cuSPARSELt on sm90, where its CUTLASS backend refuses 9.x).
  Targets: >= 1.5x dense and >= 1.0x cuSPARSELt.
- Decode GEMV: 4096 x 4096 and 4096 x 11008 (rows x K) weights, tokens 1 and 8, 2:4 and
  1:4, vs dense F.linear (reading the full weight).
"""
from __future__ import annotations

import itertools
import logging
from typing import List

import torch
import torch.nn.functional as F

from bench.harness import Case
from leanformer.ops import nm_sparse_linear
from leanformer.sparse import NMSparseMatrix

logger = logging.getLogger(__name__)

GEMM = 8192
GEMV_SHAPES = ((4096, 4096), (4096, 11008))  # (rows, K)
GEMV_TOKENS = (1, 8)
PATTERNS = ((2, 4), (1, 4))
QUICK = {"gemm": 512, "gemv_shapes": ((256, 512),)}


def _semi_structured(dense: torch.Tensor):
    """torch's own 2:4 weight (cuSPARSELt where available), or the reason it cannot run."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(dense)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if not device.startswith("cuda"):
        logger.warning("nm_sparse_cuda: GPU-only suite, skipped on %s", device)
        return []
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    out = []
    size = QUICK["gemm"] if quick else GEMM
    out += _gemm_cases(randn(size, size), randn(size, size), size, dtype, quick)
    for (rows, K), tokens, (n, m) in itertools.product(QUICK["gemv_shapes"] if quick else GEMV_SHAPES,
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
    try:
        semi = _semi_structured(dense)
        baselines["torch_semi_structured"] = lambda: F.linear(x, semi)
    except Exception as e:  # reported in the table as a missing baseline
        logger.warning("nm_sparse_cuda: to_sparse_semi_structured unavailable: %s", e)
    targets = {} if quick or dtype not in (torch.bfloat16, torch.float16) else {
        "dense_linear": 1.5, "torch_semi_structured": 1.0}
    return [Case("nm_sparse_gemm", f"{size}^3 2:4", "fwd",
                 lambda: nm_sparse_linear(x, s.values, s.meta, n=2, m=4), baselines, targets)]
