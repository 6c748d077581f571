"""Fuzz the tree_state family: sla_tree_commit (every layer's SLAB state and conv tail, in place,
after a verified path; layers with more nodes than the path reads) and tree_dwconv (the causal
depthwise conv along each node's branch): random trees and paths, tails from 0 values, every
layout (the state is written in place: an expanded one must be refused), against the references;
tree_dwconv's gradients on a subset."""
import pytest
import torch

from leanformer.ops import sla_tree_commit, tree_dwconv, verify_tree_greedy
from leanformer.reference import sla_tree_commit_reference, tree_dwconv_reference
from tests.fuzz.fuzzing import ALL_DTYPES, double, fuzz, grads_of, leaf
from tests.helpers import drafted_tree, random_parents, tolerance


@fuzz("sla_tree_commit")
def test_sla_tree_commit(case):
    state_dtype = case.pick("state_dtype", [torch.float32, torch.float64])
    kv_dtype = case.pick("kv_dtype", ALL_DTYPES)
    L, B, H = case.size("layers", 3, lo=1), case.size("B", 4), case.size("H", 3)
    T, Dk, Dv = case.size("T", 20, lo=1), case.size("Dk", 20, lo=1), case.size("Dv", 20, lo=1)
    W = case.size("W", 5)
    with_tail = case.coin("conv_tail", 0.7)
    S = [case.layout(f"S{l}", case.randn(B, H, Dk, Dv, dtype=state_dtype), keep_last_dim=True) for l in range(L)]
    z = [case.layout(f"z{l}", case.rand(B, H, Dk, dtype=state_dtype)) for l in range(L)]
    tails = [case.layout(f"tail{l}", case.randn(B * H, Dv, W, dtype=kv_dtype)) for l in range(L)] if with_tail else []
    k, v = [], []
    for l in range(L):
        Tl = T + case.size(f"extra_nodes{l}", 3)
        k.append(case.layout(f"k{l}", case.randn(B, Tl, H, Dk, dtype=kv_dtype)))
        v.append(case.layout(f"v{l}", case.randn(B, Tl, H, Dv, dtype=kv_dtype)))
    if B:
        logits, tokens, parents = drafted_tree(B, T, 5, batched_parents=True, generator=case.gen)
        path, num, _ = verify_tree_greedy(logits, tokens, parents)
        if case.coin("empty_path", 0.1):
            num = torch.zeros_like(num)
    else:
        path, num = torch.zeros(0, T, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    # num_accepted must fit each sequence's path: neither may repeat another sequence's values
    path = case.layout("path", path, expand_dims=[1])
    num = case.layout("num_accepted", num, expand_dims=[])

    written = S + z + tails
    if any(0 in t.stride() and t.numel() > 1 for t in written):  # in place: stride 0 cannot hold it
        before = [t.clone() for t in written]
        with pytest.raises(RuntimeError, match="more than one element|single memory location|overlap"):
            sla_tree_commit(S, z, tails, k, v, path, num)
        assert all(torch.equal(a, b) for a, b in zip(written, before)), "the state must be left untouched"
        return
    want = sla_tree_commit_reference(S, z, tails, k, v, path, num)
    sla_tree_commit(S, z, tails, k, v, path, num)
    # a few rank-one updates per accepted node: half the shared tolerance, elementwise (as the family's tests)
    tol = tolerance(state_dtype, 0.5)
    for name, got, ref in zip([f"S{l}" for l in range(L)] + [f"z{l}" for l in range(L)],
                              S + z, want[0] + want[1]):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol, msg=name)
    for l, (got, ref) in enumerate(zip(tails, want[2])):
        assert torch.equal(got, ref), f"tail{l}"


@fuzz("tree_dwconv")
def test_tree_dwconv(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    B, T, H, D = case.size("B", 3), case.size("T", 30, lo=1), case.size("H", 3), case.size("D", 40, lo=1)
    K = case.size("kernel_size", 5, lo=1)
    per_sequence = case.coin("per_sequence_parents")
    v = case.layout("v", case.randn(B, T, H, D, dtype=dtype))
    tail = case.layout("conv_tail", case.randn(B * H, D, K - 1, dtype=dtype))
    parents = random_parents(T, B if per_sequence else None, generator=case.gen)
    parents = case.layout("parents", parents, expand_dims=[0] if per_sequence else [])
    weight = case.layout("weight", case.randn(D, K, dtype=dtype))
    bias = case.layout("bias", case.randn(D, dtype=dtype)) if case.coin("bias") else None
    out = tree_dwconv(v, tail, parents, weight, bias)
    out_ref = tree_dwconv_reference(double(v), double(tail), parents, double(weight), double(bias))
    assert out.dtype == dtype and out.shape == (B, T, H, D)
    case.close(out, out_ref, dtype, "out", scale=0.5)
    if case.grads():
        args = [v, tail, weight, bias]
        leaves, ref_leaves = [leaf(t) for t in args], [leaf(double(t)) for t in args]
        go = case.randn(B, T, H, D, dtype=dtype)
        got = grads_of(tree_dwconv(leaves[0], leaves[1], parents, leaves[2], leaves[3]), leaves, go)
        want = grads_of(tree_dwconv_reference(ref_leaves[0], ref_leaves[1], parents, ref_leaves[2], ref_leaves[3]),
                        ref_leaves, go.double())
        for name, g, r in zip(("v", "conv_tail", "weight", "bias"), got, want):
            if r is not None:
                case.close(g, r, dtype, f"grad {name}")
