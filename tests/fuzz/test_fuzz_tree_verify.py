"""Fuzz the tree_verify family: verify_tree_greedy and verify_tree_sampling on drafted trees
(shared or per-sequence parents, padding, repeated sibling tokens, ties and NaN in the logits),
compact_kv_cache in place on the paths they accept; every layout (the caches and cache_lens are
written in place: an expanded one must be refused, not half written); against the Python walks."""
import pytest
import torch

from leanformer.ops import compact_kv_cache, verify_tree_greedy, verify_tree_sampling
from leanformer.reference import (compact_kv_cache_reference, verify_tree_greedy_reference,
                                  verify_tree_sampling_reference)
from tests.fuzz.fuzzing import ALL_DTYPES, fuzz
from tests.helpers import drafted_tree


def check_same(result, expected):
    for name, a, b in zip(("accepted", "num_accepted", "bonus"), result, expected):
        assert a.dtype == torch.long and torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"


def tree(case, vocab_hi=40):
    B, T, V = case.size("B", 6, lo=1), case.size("T", 30, lo=1, special=(2, 3)), case.size("V", vocab_hi, lo=1)
    batched = case.coin("batched_parents")
    logits, tokens, parents = drafted_tree(B, T, V, batched_parents=batched, pad_fraction=case.rng.random() * 0.4,
                                           repeat_fraction=case.rng.random() * 0.3, generator=case.gen)
    tokens = case.layout("tree_tokens", tokens, expand_dims=[0])
    parents = case.layout("parents", parents, expand_dims=[0] if batched else [])
    return B, T, V, logits, tokens, parents


@fuzz("verify_tree_greedy")
def test_verify_tree_greedy(case):
    B, T, V, logits, tokens, parents = tree(case)
    dtype = case.pick("dtype", ALL_DTYPES)
    if case.coin("ties", 0.2):
        logits = logits.round()
    if case.coin("nan", 0.1):
        logits.view(-1)[case.rng.randrange(logits.numel())] = float("nan")
    logits = case.layout("logits", logits.to(dtype))
    result = verify_tree_greedy(logits, tokens, parents)
    check_same(result, verify_tree_greedy_reference(logits, tokens, parents))


@fuzz("verify_tree_sampling")
def test_verify_tree_sampling(case):
    B, T, V, logits, tokens, parents = tree(case)
    dtype = case.pick("dtype", ALL_DTYPES)
    probs = torch.softmax(logits / case.pick("temperature", [0.3, 1.0, 3.0]), -1)
    if case.coin("zeros", 0.3):  # top-k style: most of the vocabulary at probability 0
        probs = probs * (probs >= probs.topk(min(V, 3), -1).values[..., -1:])
    probs = case.layout("probs", probs.to(dtype))
    seed = case.rng.randrange(2 ** 31)
    result = verify_tree_sampling(probs, tokens, parents, generator=torch.Generator().manual_seed(seed))
    uniforms = torch.rand((B, T), generator=torch.Generator().manual_seed(seed))
    check_same(result, verify_tree_sampling_reference(probs, tokens, parents, uniforms))
    uniforms = case.layout("uniforms", torch.cat([uniforms, case.rand(B, case.rng.randint(0, 3))], 1))
    check_same(torch.ops.leanformer.verify_tree_sampling(probs, tokens, parents, uniforms),
               verify_tree_sampling_reference(probs, tokens, parents, uniforms))


@fuzz("compact_kv_cache")
def test_compact_kv_cache(case):
    B, T, V, logits, tokens, parents = tree(case, vocab_hi=8)
    accepted, num, _ = verify_tree_greedy(logits, tokens, parents)
    dtype = case.pick("dtype", ALL_DTYPES + [torch.int32])
    L_max = T + case.size("spare", 20)
    H, D, Dv = case.size("H", 3, lo=1), case.size("D", 9, lo=1), case.size("Dv", 9, lo=1)
    lens = torch.tensor([case.rng.randint(0, L_max - T) for _ in range(B)], dtype=torch.long)
    k = (case.randn(B, L_max, H, D) * 100).to(dtype)
    v = (case.randn(B, L_max, H, Dv) * 100).to(dtype)
    want = compact_kv_cache_reference(k, v, lens, accepted, num)
    k_cache, v_cache = case.layout("k_cache", k), case.layout("v_cache", v)
    cache_lens = case.layout("cache_lens", lens)
    # a path must ascend and num_accepted fit it: their values may not repeat (expand)
    accepted = case.layout("accepted", accepted, expand_dims=[])
    num = case.layout("num_accepted", num, expand_dims=[])
    overlapping = [t for t in (k_cache, v_cache, cache_lens) if 0 in t.stride() and t.numel() > 1]
    if overlapping:  # written in place: a stride-0 tensor cannot hold the result
        before = [t.clone() for t in (k_cache, v_cache, cache_lens)]
        with pytest.raises(RuntimeError, match="more than one element|single memory location|overlap"):
            compact_kv_cache(k_cache, v_cache, cache_lens, accepted, num)
        assert all(torch.equal(a, b) for a, b in zip((k_cache, v_cache, cache_lens), before)), "left untouched"
        return
    compact_kv_cache(k_cache, v_cache, cache_lens, accepted, num)
    for name, got, ref in zip(("k_cache", "v_cache", "cache_lens"), (k_cache, v_cache, cache_lens), want):
        assert torch.equal(got, ref), name
