"""Simplified linear attention against the code a user would otherwise write."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, label, time_case
from leanformer.ops import simplified_linear_attention, simplified_linear_attention_step
from leanformer.reference import (
    sla_causal_chunked_reference,
    sla_causal_quadratic_reference,
    sla_noncausal_reference,
    sla_step_reference,
)

# Default shapes: (B, T, H, D). The targets are the project's goals for a 2-core CPU (fp32).
NONCAUSAL_SHAPE = (4, 1024, 4, 64)
CAUSAL_SHAPE = (1, 4096, 8, 64)
STEP_SHAPE = (1, 8, 64)  # batch, heads, head dim
QUICK = {"noncausal": (2, 100, 2, 16), "causal": (1, 130, 2, 16), "step": (1, 2, 16)}


def _sdpa(q, k, v, causal):
    # SDPA wants [B, H, T, D]; the transposes are part of what a user would run.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def _fla_baseline():
    """flash-linear-attention's chunk_linear_attn with a ReLU feature map, if installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None

    import inspect

    # Older fla releases default to head_first=True ([B, H, T, D]); ours is [B, T, H, D].
    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def run(q, k, v):
        return chunk_linear_attn(F.relu(q), F.relu(k), v, scale=1.0, normalize=True, **layout)[0]

    return run


def _fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    on_cpu = device == "cpu"
    fla = _fla_baseline() if device == "cuda" else None
    noncausal = QUICK["noncausal"] if quick else NONCAUSAL_SHAPE
    causal = QUICK["causal"] if quick else CAUSAL_SHAPE
    step = QUICK["step"] if quick else STEP_SHAPE
    # One function per section: each binds its own tensors (lambdas capture names, not values).
    return [*_noncausal_cases([randn(*noncausal) for _ in range(3)], on_cpu),
            *_causal_cases([randn(*causal) for _ in range(3)], on_cpu, fla),
            *_step_cases([randn(*step) for _ in range(3)], g, on_cpu)]


def _noncausal_cases(qkv, on_cpu):
    q, k, v = qkv
    shape = label(q.shape)
    qg, kg, vg = (x.clone().requires_grad_(True) for x in qkv)
    return [
        Case("sla_noncausal", shape, "fwd", lambda: simplified_linear_attention(q, k, v),
             {"eager": lambda: sla_noncausal_reference(q, k, v), "sdpa": lambda: _sdpa(q, k, v, False)},
             {"eager": 1.5} if on_cpu else {}),
        Case("sla_noncausal", shape, "fwd+bwd",
             _fwd_bwd(lambda a, b, c: simplified_linear_attention(a, b, c), (qg, kg, vg)),
             {"eager": _fwd_bwd(sla_noncausal_reference, (qg, kg, vg)),
              "sdpa": _fwd_bwd(lambda a, b, c: _sdpa(a, b, c, False), (qg, kg, vg))}),
    ]


def _causal_cases(qkv, on_cpu, fla):
    q, k, v = qkv
    shape = label(q.shape)
    fwd = {"sdpa_causal": lambda: _sdpa(q, k, v, True),
           "eager_quadratic": lambda: sla_causal_quadratic_reference(q, k, v),
           "eager_chunked": lambda: sla_causal_chunked_reference(q, k, v)}
    qg, kg, vg = (x.clone().requires_grad_(True) for x in qkv)
    bwd = {"eager_chunked": _fwd_bwd(sla_causal_chunked_reference, (qg, kg, vg)),
           "sdpa_causal": _fwd_bwd(lambda a, b, c: _sdpa(a, b, c, True), (qg, kg, vg))}
    if fla is not None:
        fwd["fla_chunk_linear_attn"] = lambda: fla(q, k, v)
        bwd["fla_chunk_linear_attn"] = _fwd_bwd(fla, (qg, kg, vg))
    return [
        Case("sla_causal", shape, "fwd", lambda: simplified_linear_attention(q, k, v, causal=True), fwd,
             {"sdpa_causal": 5.0, "eager_quadratic": 20.0} if on_cpu else {}),
        Case("sla_causal", shape, "fwd+bwd",
             _fwd_bwd(lambda a, b, c: simplified_linear_attention(a, b, c, causal=True), (qg, kg, vg)),
             bwd, {"eager_chunked": 3.0} if on_cpu else {}),
    ]


def _step_cases(qkv, g, on_cpu):
    q, k, v = qkv
    B, H, D = q.shape
    state = (torch.rand(B, H, D, D, generator=g).to(q.device), torch.rand(B, H, D, generator=g).to(q.device))
    return [Case("sla_step", label(q.shape), "step",
                 lambda: simplified_linear_attention_step(q, k, v, state),
                 {"eager": lambda: sla_step_reference(q, k, v, state)},
                 {"eager": 3.0} if on_cpu else {})]


@bench_cases(cases)
def test_linear_attention(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
