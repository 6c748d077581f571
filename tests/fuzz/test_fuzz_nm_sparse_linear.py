"""Fuzz nm_sparse_linear (and dense_min_tokens): every N:M pattern, token counts on both sides of
the CPU's dense switch, odd K and rows, every layout of x, values, meta and bias, the odd
non-finite x, against the unpack + dense fp64 reference; gradients on a subset."""
import torch

from leanformer.ops import dense_min_tokens, nm_sparse_linear
from leanformer.reference import nm_sparse_linear_reference
from leanformer.sparse import NMSparseMatrix
from tests.fuzz.fuzzing import ALL_DTYPES, assert_same_nonfinite, double, fuzz, grads_of, leaf

PATTERNS = [(n, m) for m in (2, 4, 8, 16) for n in range(1, m)]
SCALE = 0.5  # short sums (K/m*n products): as tests/ops/test_nm_sparse_linear.py


@fuzz("nm_sparse_linear", covers=["dense_min_tokens"])
def test_nm_sparse_linear(case):
    n, m = case.pick("pattern", PATTERNS)
    dtype = case.pick("dtype", ALL_DTYPES)
    K = m * case.size("groups", 12, special=(8, 16))
    rows = case.size("rows", 40, special=(32, 33))
    switch = dense_min_tokens(n, m)
    assert switch == 16 * m * m // (n * n)
    near_switch = [t for t in (switch - 1, switch) if t <= 300]
    tokens = case.pick("tokens", [0, 1, 2, 3, 5, 8, 9, 17, case.rng.randint(1, 70)] + near_switch * 2)
    lead = case.pick("lead", [(tokens,), (1, tokens), (tokens, 1)] +
                     ([(tokens // 3, 3)] if tokens % 3 == 0 and tokens else []))
    s = NMSparseMatrix.prune(case.randn(rows, K), n, m)
    x = case.randn(*lead, K).to(dtype)
    if x.numel() and case.coin("nonfinite", 0.15):
        flat = x.view(-1)
        for value in (float("nan"), float("inf"), -float("inf")):
            flat[case.rng.randrange(flat.numel())] = value
    values = case.layout("values", s.values.to(dtype))
    meta = case.layout("meta", s.meta, expand_dims=[0])  # rows may repeat; words hold whole groups only for some n
    bias = case.layout("bias", case.randn(rows, dtype=dtype)) if case.coin("bias") else None
    x = case.layout("x", x)

    y = nm_sparse_linear(x, values, meta, bias, n=n, m=m)
    y_ref = nm_sparse_linear_reference(double(x), double(values), meta, double(bias), n=n, m=m)
    assert y.dtype == dtype and y.shape == (*lead, rows)
    assert_same_nonfinite(y, y_ref, dtype, "y", scale=SCALE)

    if case.grads():
        leaves = [leaf(x), leaf(values), leaf(bias)]
        grad_y = case.randn(*lead, rows, dtype=dtype)
        got = grads_of(nm_sparse_linear(leaves[0], leaves[1], meta, leaves[2], n=n, m=m), leaves, grad_y)
        ref_leaves = [leaf(double(t)) for t in (x, values, bias)]
        want = grads_of(nm_sparse_linear_reference(ref_leaves[0], ref_leaves[1], meta, ref_leaves[2], n=n, m=m),
                        ref_leaves, grad_y.double())
        for name, g, w in zip(("grad_x", "grad_values", "grad_bias"), got, want):
            if w is not None:
                assert g.dtype == dtype, name
                assert_same_nonfinite(g, w, dtype, name, scale=SCALE)
