"""Tree attention (one tree-verification step of speculative decoding) against dense attention
with an explicit mask over [prefix + tree].

Shapes of the issue: prefix 2048, tree 64 nodes, head dim 64, batch 1, with Hq = Hkv = 8 and
a GQA case (Hq = 8, Hkv = 2), plus batch 4 with a different prefix length per sequence.
The tree's K/V sit in the cache right after each prefix (where a decoder writes them), so the
baselines need no concatenation:
- sdpa_additive_mask: F.scaled_dot_product_attention over cache[:, :L_max + T] with the
  additive [B, 1, T, L_max + T] mask built for this step (cache_lens change every step);
- sdpa_prebuilt_mask: the same with the mask built outside the timing (the attention alone).
tree_linear_attention (the same step for a linear-attention model, prefix as a state) is
compared with its eager masked-quadratic reference.

On a GPU (`--device cuda`, test_tree_attention_cuda), also the sizes a GPU decodes at: prefix
2048 / 8192, tree 64, head dim 128, Hq = 32, Hkv = 8 (GQA), batch 1 and 8 (different lengths
per sequence), against the same two SDPA baselines.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from bench.case import Case, bench_cases, time_case
from leanformer.ops import tree_attention, tree_linear_attention
from leanformer.reference import ancestor_mask, tree_linear_attention_reference

PREFIX, TREE, HEAD_DIM = 2048, 64, 64
QUICK = {"prefix": 96, "tree": 8, "head_dim": 16}
CUDA_HEAD_DIM, CUDA_HQ, CUDA_HKV = 128, 32, 8
CUDA_QUICK = {"prefixes": (256,), "batches": (1, 2), "tree": 8}


def _tree_mask(T: int, g: torch.Generator, device: str) -> torch.Tensor:
    """A random tree (parents[i] uniform in [0, i)), as the drafters' trees are irregular."""
    parents = (torch.rand(T, generator=g) * torch.arange(T)).long()
    parents[0] = -1
    return ancestor_mask(parents).to(device)


def _sdpa_step(q, cache_k, cache_v, mask):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), cache_k.transpose(1, 2), cache_v.transpose(1, 2),
                                       attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)


def cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    g = torch.Generator().manual_seed(0)
    prefix, T, D = (QUICK["prefix"], QUICK["tree"], QUICK["head_dim"]) if quick else (PREFIX, TREE, HEAD_DIM)
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    on_cpu = device == "cpu"
    out = []
    for B, Hq, Hkv, lens in [(1, 8, 8, [prefix]), (1, 8, 2, [prefix]),
                             (4, 8, 2, [prefix, prefix // 2, prefix // 4, 3 * prefix // 4])]:
        L_max = prefix + T
        cache_k, cache_v = randn(B, L_max, Hkv, D), randn(B, L_max, Hkv, D)
        k_tree, v_tree = randn(B, T, Hkv, D), randn(B, T, Hkv, D)
        cache_lens = torch.tensor(lens, device=device)
        for b, L in enumerate(lens):  # the tree's K/V follow each prefix, as a decoder writes them
            cache_k[b, L:L + T], cache_v[b, L:L + T] = k_tree[b], v_tree[b]
        q = randn(B, T, Hq, D)
        tree_mask = _tree_mask(T, g, device)
        # Dense masks see slot L + i as tree node i; everything past L + T is masked.
        dense_mask = lambda cl=cache_lens, m=tree_mask, L=L_max: _dense_mask(cl, m, L, dtype)
        prebuilt = dense_mask()
        label = f"B={B} prefix={'/'.join(map(str, lens))} tree={T} Hq={Hq} Hkv={Hkv} D={D}"
        targets = {"sdpa_additive_mask": 2.0} if on_cpu and not quick and B == 1 and dtype == torch.float32 else {}
        out.append(Case(
            "tree_attention", label, "fwd",
            lambda q=q, ck=cache_k, cv=cache_v, cl=cache_lens, kt=k_tree, vt=v_tree, m=tree_mask:
                tree_attention(q, ck, cv, cl, kt, vt, m),
            {"sdpa_additive_mask": lambda q=q, ck=cache_k, cv=cache_v, mk=dense_mask: _sdpa_step(q, ck, cv, mk()),
             "sdpa_prebuilt_mask": lambda q=q, ck=cache_k, cv=cache_v, m=prebuilt: _sdpa_step(q, ck, cv, m)},
            targets))
    out += _linear_cases(g, device, dtype, T, D)
    return out


def _dense_mask(cache_lens, tree_mask, L_max, dtype):
    """[B, 1, T, L_max] additive: prefix slots below cache_lens[b], then tree node j at slot L + j."""
    T = tree_mask.shape[-1]
    rel = torch.arange(L_max, device=cache_lens.device)[None] - cache_lens[:, None]  # [B, L_max]
    in_tree = (rel >= 0) & (rel < T)
    allowed = (rel < 0)[:, None] | (in_tree[:, None] & tree_mask[:, rel.clamp(0, T - 1)].transpose(0, 1))
    zero = torch.zeros((), dtype=dtype, device=cache_lens.device)
    return torch.where(allowed, zero, torch.full_like(zero, float("-inf")))[:, None]


def _linear_cases(g, device, dtype, T, D):
    B, H = 1, 8
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    S = torch.rand(B, H, D, D, generator=g).to(device, state_dtype)
    z = torch.rand(B, H, D, generator=g).to(device, state_dtype)
    mask = _tree_mask(T, g, device)
    return [Case("tree_linear_attention", f"B={B} tree={T} H={H} D={D}", "fwd",
                 lambda: tree_linear_attention(q, k, v, S, z, mask),
                 {"eager_reference": lambda: tree_linear_attention_reference(q, k, v, S, z, mask)})]


def cuda_cases(device: str, dtype: torch.dtype, quick: bool = False) -> List[Case]:
    """tree_attention at the sizes a GPU decodes at."""
    g = torch.Generator().manual_seed(0)
    prefixes, batches = (CUDA_QUICK["prefixes"], CUDA_QUICK["batches"]) if quick else ((2048, 8192), (1, 8))
    T = CUDA_QUICK["tree"] if quick else TREE
    return [_cuda_case(g, device, dtype, B, prefix, T) for prefix in prefixes for B in batches]


def _cuda_case(g, device, dtype, B, prefix, T):
    D, HQ, HKV = CUDA_HEAD_DIM, CUDA_HQ, CUDA_HKV
    randn = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    lens = [prefix - (b * prefix) // (2 * B) for b in range(B)]  # different lengths per sequence
    L_max = prefix + T
    cache_k, cache_v = randn(B, L_max, HKV, D), randn(B, L_max, HKV, D)
    k_tree, v_tree = randn(B, T, HKV, D), randn(B, T, HKV, D)
    for b, L in enumerate(lens):  # the tree's K/V follow each prefix, as a decoder writes them
        cache_k[b, L:L + T], cache_v[b, L:L + T] = k_tree[b], v_tree[b]
    cache_lens = torch.tensor(lens, device=device)
    q = randn(B, T, HQ, D)
    tree_mask = _tree_mask(T, g, device)
    prebuilt = _dense_mask(cache_lens, tree_mask, L_max, dtype)
    return Case(
        "tree_attention", f"B={B} prefix<={prefix} tree={T} Hq={HQ} Hkv={HKV} D={D}", "fwd",
        lambda: tree_attention(q, cache_k, cache_v, cache_lens, k_tree, v_tree, tree_mask),
        {"sdpa_additive_mask": lambda: _sdpa_step(q, cache_k, cache_v,
                                                  _dense_mask(cache_lens, tree_mask, L_max, dtype)),
         "sdpa_prebuilt_mask": lambda: _sdpa_step(q, cache_k, cache_v, prebuilt)})


@bench_cases(cases)
def test_tree_attention(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)


@bench_cases(cuda_cases, devices=("cuda",))
def test_tree_attention_cuda(benchmark, case, impl, bench_round):
    time_case(benchmark, case, impl, bench_round)
