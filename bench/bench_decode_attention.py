"""decode_attention (one decoding step's RoPE, cache write and attention of a layer) against the
unfused PyTorch steps LlamaLM's decoding step ran before it: RoPE by the tables, two index_copy_
into the cache, F.scaled_dot_product_attention over the first max(lens) + 1 slots (GQA, an
additive mask when the lengths differ), on every intra-op thread (the model's unfused step switches to one
thread around SDPA: with two on a busy host, SDPA's OpenMP region waits milliseconds for a descheduled worker).

Shapes of SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64): batch 1 after 130 and
1000 tokens, and batch 4 with a different length per sequence."""
from __future__ import annotations

import functools
from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, time_case
from leanformer.models.llama import rope_tables
from leanformer.ops import decode_attention

H, HKV, HEAD_DIM, L_MAX = 9, 3, 64, 2048
QUICK = {"lens": ([20], [30, 5]), "L_max": 64}


def _unfused(qkv, k_cache, v_cache, lens, cos, sin):
    B, L, Hkv, D = k_cache.shape
    h = qkv.view(B, H + 2 * Hkv, D)
    qk = h[:, :H + Hkv].float()  # RoPE in fp32, as the model's step
    qk = qk * cos[lens][:, None] + torch.cat([qk[..., D // 2:], qk[..., :D // 2]], -1) * sin[lens][:, None]
    qk = qk.to(qkv.dtype)
    rows = lens + torch.arange(0, B * L, L, device=lens.device)
    k_cache.view(-1, Hkv, D).index_copy_(0, rows, qk[:, H:])
    v_cache.view(-1, Hkv, D).index_copy_(0, rows, h[:, H + Hkv:])
    Lk = int(lens.max()) + 1
    mask = None
    if B > 1:
        hidden = (torch.arange(Lk, device=lens.device) > lens[:, None]).view(B, 1, 1, Lk)
        mask = torch.zeros(hidden.shape, device=lens.device, dtype=qkv.dtype).masked_fill_(hidden, float("-inf"))
    o = F.scaled_dot_product_attention(qk[:, :H].unsqueeze(2), k_cache[:, :Lk].transpose(1, 2),
                                       v_cache[:, :Lk].transpose(1, 2), attn_mask=mask, enable_gqa=True)
    return o.reshape(B, H * D)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    L_max = QUICK["L_max"] if quick else L_MAX
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    cos, sin = rope_tables(L_max, HEAD_DIM, 10000.0, device)
    out = []
    for lens in QUICK["lens"] if quick else ([130], [1000], [130, 700, 20, 400]):
        B = len(lens)
        qkv = randn(B, (H + 2 * HKV) * HEAD_DIM)
        k_cache, v_cache = randn(B, L_max, HKV, HEAD_DIM), randn(B, L_max, HKV, HEAD_DIM)
        lens_t = torch.tensor(lens, device=device)
        args = (qkv, k_cache, v_cache, lens_t, cos, sin)
        out.append(Case("decode_attention", f"B={B} H={H} Hkv={HKV} D={HEAD_DIM} lens={lens}", "step",
                        functools.partial(decode_attention, *args, H),
                        {"unfused_sdpa": functools.partial(_unfused, *args)}))
    return out


@bench_cases(cases)
def test_decode_attention(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
