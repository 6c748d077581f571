"""Fuzz tree_attention (softmax over the KV cache prefix + the tree, GQA) and
tree_linear_attention (the SLAB state + the tree): random trees, one shared or per-sequence masks,
cache lengths from 0 to L_max, every layout (masks expanded along the batch, a [T, T] mask
expanded to [B, T, T]), against the dense fp64 references; gradients on a subset."""
import torch

from leanformer.ops import tree_attention, tree_linear_attention
from leanformer.reference import ancestor_mask, tree_attention_reference, tree_linear_attention_reference
from tests.fuzz.fuzzing import ALL_DTYPES, double, fuzz, grads_of, leaf
from tests.fuzz.test_fuzz_linear_attention import cancelling_terms, grad_scale
from tests.helpers import random_parents


def tree_mask(case, B, T):
    """An ancestor mask [T, T] or [B, T, T] of random trees, in a random layout (its values must
    stay a tree's, so only the batch dim may repeat)."""
    shape = case.pick("mask", ["shared", "batched", "shared expanded to batch"])
    if shape == "batched":
        mask = ancestor_mask(random_parents(T, B, generator=case.gen))
        return case.layout("tree_mask", mask, expand_dims=[0])
    mask = case.layout("tree_mask", ancestor_mask(random_parents(T, generator=case.gen)), expand_dims=[])
    return mask.expand(B, T, T) if shape.endswith("batch") else mask


@fuzz("tree_attention")
def test_tree_attention(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    B, T = case.size("B", 3), case.size("T", 40, lo=1, special=(19, 64, 65))
    Hkv = case.size("Hkv", 3, lo=1)
    Hq = Hkv * case.size("groups", 3, lo=1)
    D, Dv = case.size("D", 40, lo=1, special=(16, 32)), case.size("Dv", 40, lo=1, special=(16, 32))
    L_max = case.size("L_max", 140, special=(64, 65, 128, 129))
    lens = torch.tensor([case.rng.choice([0, L_max, case.rng.randint(0, L_max)]) for _ in range(B)], dtype=torch.long)
    case.note("cache_lens", lens.tolist())
    q = case.layout("q", case.randn(B, T, Hq, D, dtype=dtype))
    k_cache = case.layout("k_cache", case.randn(B, L_max, Hkv, D, dtype=dtype))
    v_cache = case.layout("v_cache", case.randn(B, L_max, Hkv, Dv, dtype=dtype))
    k_tree = case.layout("k_tree", case.randn(B, T, Hkv, D, dtype=dtype))
    v_tree = case.layout("v_tree", case.randn(B, T, Hkv, Dv, dtype=dtype))
    cache_lens = case.layout("cache_lens", lens)
    mask = tree_mask(case, B, T)
    scale = case.pick("scale", [None, 0.3])
    args = [q, k_cache, v_cache, cache_lens, k_tree, v_tree, mask]
    out = tree_attention(*args, scale=scale)
    out_ref = tree_attention_reference(*(double(t) for t in args), scale=scale)
    assert out.dtype == dtype and out.shape == (B, T, Hq, Dv)
    # weighted averages of N(0, 1) values: the error held to the tolerance itself (as the family's tests)
    case.close(out, out_ref, dtype, "out", absolute=True)
    if case.grads():
        diff = [0, 1, 2, 4, 5]
        leaves = [leaf(t) if i in diff else t for i, t in enumerate(args)]
        ref_leaves = [leaf(double(t)) if i in diff else double(t) for i, t in enumerate(args)]
        go = case.randn(B, T, Hq, Dv, dtype=dtype)
        got = grads_of(tree_attention(*leaves, scale=scale), [leaves[i] for i in diff], go)
        want = grads_of(tree_attention_reference(*ref_leaves, scale=scale), [ref_leaves[i] for i in diff], go.double())
        for name, g, r in zip(("q", "k_cache", "v_cache", "k_tree", "v_tree"), got, want):
            case.close(g, r, dtype, f"grad {name}")


@fuzz("tree_linear_attention")
def test_tree_linear_attention(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    B, T, H = case.size("B", 3), case.size("T", 40, lo=1, special=(16, 17)), case.size("H", 3, lo=1)
    Dk, Dv = case.size("Dk", 40, lo=1, special=(16, 17)), case.size("Dv", 40, lo=1, special=(16, 17))
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    q = case.layout("q", case.randn(B, T, H, Dk, dtype=dtype, shift=0.5))
    k = case.layout("k", case.randn(B, T, H, Dk, dtype=dtype, shift=0.5))
    v = case.layout("v", case.randn(B, T, H, Dv, dtype=dtype))
    S = case.layout("S", case.rand(B, H, Dk, Dv, dtype=sd))
    z = case.layout("z", case.rand(B, H, Dk, dtype=sd))
    mask = tree_mask(case, B, T)
    args = [q, k, v, S, z]
    out = tree_linear_attention(*args, mask)
    out_ref = tree_linear_attention_reference(*(double(t) for t in args), mask)
    assert out.dtype == dtype and out.shape == (B, T, H, Dv)
    case.close(out, out_ref, dtype, "out")
    if case.grads():
        leaves, ref_leaves = [leaf(t) for t in args], [leaf(double(t)) for t in args]
        go = case.randn(B, T, H, Dv, dtype=dtype)
        got = grads_of(tree_linear_attention(*leaves, mask), leaves, go)
        o_ref = tree_linear_attention_reference(*ref_leaves, mask)
        want = grads_of(o_ref, ref_leaves, go.double())
        # dq and dk are differences of nearly equal terms where one feature is positive (as in
        # simplified_linear_attention): their error is relative to those terms
        terms = cancelling_terms(*(double(t) for t in (q, k, v)), o_ref.detach(), go.double(), False,
                                 double(z), mask=mask)
        for name, g, r in zip(("q", "k", "v", "S", "z"), got, want):
            case.close(g, r, dtype if name in "qkv" else sd, f"grad {name}",
                       scale=grad_scale(terms, r) if name in "qk" else 1.0)
