"""Fuzz decode_attention: one new token per sequence over a KV cache (RoPE, the cache write, the
attention), random head counts and head dims, lengths per sequence from 0 to the cache's last
slot, qkv, lens and the RoPE tables in every layout, every dtype it takes; the caches are written
in place, so a non-contiguous (expanded, strided) one must be refused and left untouched."""
import pytest
import torch

from leanformer.ops import decode_attention
from leanformer.reference import decode_attention_reference
from tests.fuzz.fuzzing import fuzz
from tests.helpers import sequential_decode_steps


@fuzz("decode_attention")
def test_decode_attention(case):
    dtype = case.pick("dtype", [torch.float32, torch.bfloat16, torch.float16])
    B, Hkv, G = case.size("B", 3), case.size("Hkv", 3, lo=1), case.size("G", 4, lo=1)
    D = 2 * case.size("D/2", 40, lo=1, special=(4, 8, 16, 32))
    L = case.size("L", 300, lo=1, special=(1, 16, 17, 128, 129))
    H = Hkv * G
    qkv = case.layout("qkv", case.randn(B, (H + 2 * Hkv) * D, dtype=dtype))
    cache_kinds = ["contiguous", "offset"] + (["expanded", "strided"] if case.coin("bad_cache", 0.1) else [])
    k_cache = case.layout("k_cache", case.randn(B, L, Hkv, D, dtype=dtype), kinds=cache_kinds)
    v_cache = case.layout("v_cache", case.randn(B, L, Hkv, D, dtype=dtype), kinds=cache_kinds)
    lens = case.randint(0, L, (B,))
    if B and case.coin("a full cache", 0.2):
        lens[0] = L - 1
    lens = case.layout("lens", lens, expand_dims=[])
    P = L + case.size("extra_positions", 5)
    angles = case.rand(P, D // 2) * 6.0
    cos = case.layout("cos", torch.cat([angles.cos(), angles.cos()], -1))
    sin = case.layout("sin", torch.cat([-angles.sin(), angles.sin()], -1))

    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        before = (k_cache.clone(), v_cache.clone())
        with pytest.raises(RuntimeError, match="must be contiguous"):
            decode_attention(qkv, k_cache, v_cache, lens, cos, sin, H)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the caches must be untouched"
        return
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = decode_attention_reference(qkv, k_ref, v_ref, lens, cos, sin, H)
    out = decode_attention(qkv, k_cache, v_cache, lens, cos, sin, H)
    assert out.dtype == dtype and out.shape == (B, H * D)
    case.close(out, want, dtype, "out", absolute=True)
    case.close(k_cache, k_ref, dtype, "k_cache")
    assert torch.equal(v_cache, v_ref), "v_cache"


@fuzz("decode_attention_tree", weight=0.5)
def test_decode_attention_tree(case):
    """Random trees (shared or per sequence) over random prefixes: every node equals, bit for bit,
    plain decode_attention steps along its path."""
    from leanformer.ops import decode_attention_tree
    dtype = case.pick("dtype", [torch.float32, torch.bfloat16, torch.float16])
    B, Hkv, G = case.size("B", 3, lo=1), case.size("Hkv", 3, lo=1), case.size("G", 3, lo=1)
    D, T = 2 * case.size("D/2", 24, lo=1, special=(4, 8, 16)), case.size("T", 9, lo=1)
    H, L = Hkv * G, T + case.size("L - T", 40)
    shared = case.coin("one tree for the batch")
    parents = torch.stack([torch.tensor([-1] + [int(case.randint(0, i, ())) for i in range(1, T)])
                           for _ in range(1 if shared else B)])
    parents = parents[0] if shared else parents
    lens = case.randint(0, L - T + 1, (B,))
    qkv = case.layout("qkv", case.randn(B, T, (H + 2 * Hkv) * D, dtype=dtype), keep_last_dim=True)
    k_cache, v_cache = case.randn(B, L, Hkv, D, dtype=dtype), case.randn(B, L, Hkv, D, dtype=dtype)
    angles = case.rand(L + 2, D // 2) * 6.0
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([-angles.sin(), angles.sin()], -1)
    out = decode_attention_tree(qkv, k_cache.clone(), v_cache.clone(), lens, cos, sin, H, parents)
    want, _ = sequential_decode_steps(qkv, k_cache, v_cache, lens, cos, sin, H, parents)
    assert torch.equal(out, want), "every node bit for bit its plain decode_attention steps"
