"""rms_norm (one C++ call) against F.rms_norm and the eager decomposition
``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w`` (CPU, float32).

Decoding SmolLM2-135M at batch 1 calls RMSNorm 61 times per token on one row of 576 values,
where the call overhead is the cost: each case times 61 calls under inference mode (as
``generate`` runs), at ``[1, 576]`` (a decoding step), ``[64, 576]`` (a 64-node token tree or a
short prefill) and ``[8, 4096]`` (a wider model's rows)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, run_all, time_case
from leanformer.ops import rms_norm

CALLS = 61  # RMSNorm calls per SmolLM2-135M token: 2 per layer x 30 layers + the final norm
EPS = 1e-5
SHAPES = [(1, 576), (64, 576), (8, 4096)]
QUICK = [(1, 576), (4, 64)]


def _eager(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _f_rms_norm(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    if device != "cpu" or dtype != torch.float32:
        return []  # a CPU op (CUDA users keep F.rms_norm)
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in QUICK if quick else SHAPES:
        x, w = torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g)
        calls = [(x, w, EPS)] * CALLS
        out.append(Case("rms_norm", f"[{', '.join(map(str, shape))}] x {CALLS} calls", "fwd",
                        lambda a=calls: run_all(rms_norm, a),
                        {"F.rms_norm": lambda a=calls: run_all(_f_rms_norm, a),
                         "eager": lambda a=calls: run_all(_eager, a)}))
    return out


@bench_cases(cases)
def test_rms_norm(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
