"""Fuzz the packed_linear family (CPU, fp32 and fp64): pack_linear_weight / unpack_linear_weight /
pack_swiglu_weight round trips, packed_linear and packed_swiglu on every row count around the
tiles' heights, partial panels, every layout of x, the packed weights and the bias, against
F.linear in fp64; gradients on a subset."""
import torch

from leanformer.ops import pack_linear_weight, pack_swiglu_weight, packed_linear, packed_swiglu, unpack_linear_weight
from leanformer.reference import packed_linear_reference, packed_swiglu_reference
from tests.fuzz.fuzzing import double, fuzz, grads_of, leaf

DTYPES = [torch.float32, torch.float64]  # the packed kernels' dtypes
SCALE = 0.5  # one short dot per output (as tests/ops/test_packed_linear.py)


def rows_shape(case):
    return case.pick("rows", [(0,), (1,), (2,), (5,), (6,), (7,), (11,), (12,), (13,), (19,),
                              (case.rng.randint(1, 40),), (3, case.rng.randint(0, 13))])


@fuzz("pack_linear_weight", weight=0.5, covers=["unpack_linear_weight", "pack_swiglu_weight"])
def test_pack_and_unpack_round_trip(case):
    dtype = case.pick("dtype", DTYPES)
    N, K = case.size("N", 100, special=(31, 32, 33)), case.size("K", 40)
    w = case.layout("weight", case.randn(N, K, dtype=dtype))
    p = pack_linear_weight(w)
    assert p.shape == (-(-N // 32), K, 32) and p.is_contiguous()
    assert torch.equal(unpack_linear_weight(p, N), w)
    assert torch.equal(p.transpose(1, 2).reshape(p.shape[0] * 32, K)[N:], torch.zeros(p.shape[0] * 32 - N, K, dtype=dtype))
    gate, up = case.layout("gate", case.randn(N, K, dtype=dtype)), case.layout("up", case.randn(N, K, dtype=dtype))
    pg = pack_swiglu_weight(gate, up)
    assert pg.shape == (p.shape[0], 2, K, 32)
    assert torch.equal(unpack_linear_weight(pg[:, 0], N), gate) and torch.equal(unpack_linear_weight(pg[:, 1], N), up)


@fuzz("packed_linear")
def test_packed_linear(case):
    dtype = case.pick("dtype", DTYPES)
    rows = rows_shape(case)
    N, K = case.size("N", 130, special=(31, 32, 33, 64)), case.size("K", 90, special=(16, 33))
    w = case.randn(N, K, dtype=dtype)
    packed = case.layout("packed_weight", pack_linear_weight(w))
    x = case.layout("x", case.randn(*rows, K, dtype=dtype))
    b = case.layout("bias", case.randn(N, dtype=dtype)) if case.coin("bias") else None
    y = packed_linear(x, packed, b, N)
    y_ref = packed_linear_reference(double(x), double(packed), double(b), N)
    assert y.dtype == dtype and y.shape == (*rows, N)
    case.close(y, y_ref, dtype, "y", scale=SCALE)
    if case.grads():
        leaves, ref_leaves = [leaf(t) for t in (x, packed, b)], [leaf(double(t)) for t in (x, packed, b)]
        go = case.randn(*rows, N, dtype=dtype)
        got = grads_of(packed_linear(leaves[0], leaves[1], leaves[2], N), leaves, go)
        want = grads_of(packed_linear_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], N), ref_leaves,
                        go.double())
        for name, g, r in zip(("grad_x", "grad_packed_weight", "grad_bias"), got, want):
            if r is not None:
                case.close(g, r, dtype, name, scale=SCALE)


@fuzz("packed_swiglu")
def test_packed_swiglu(case):
    dtype = case.pick("dtype", DTYPES)
    rows = rows_shape(case)
    hidden, K = case.size("hidden", 130, special=(31, 32, 33, 64)), case.size("K", 90, special=(16, 33))
    packed = case.layout("packed_gate_up", pack_swiglu_weight(case.randn(hidden, K, dtype=dtype),
                                                              case.randn(hidden, K, dtype=dtype)))
    x = case.layout("x", case.randn(*rows, K, dtype=dtype))
    y = packed_swiglu(x, packed, hidden)
    y_ref = packed_swiglu_reference(double(x), double(packed), hidden)
    assert y.dtype == dtype and y.shape == (*rows, hidden)
    case.close(y, y_ref, dtype, "y", scale=SCALE)
    if case.grads():
        leaves, ref_leaves = [leaf(x), leaf(packed)], [leaf(double(x)), leaf(double(packed))]
        go = case.randn(*rows, hidden, dtype=dtype)
        got = grads_of(packed_swiglu(leaves[0], leaves[1], hidden), leaves, go)
        want = grads_of(packed_swiglu_reference(ref_leaves[0], ref_leaves[1], hidden), ref_leaves, go.double())
        for name, g, r in zip(("grad_x", "grad_packed_gate_up"), got, want):
            case.close(g, r, dtype, name, scale=SCALE)
