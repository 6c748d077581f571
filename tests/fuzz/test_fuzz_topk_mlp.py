"""Fuzz the top-k sparse MLP ops: topk_activation, sparse_down_projection, topk_mlp and
predicted_sparse_mlp. k from 0 to d_ff, one and several rows (the CPU's dense-dot path at <= 8
fp32 rows), repeated indices, both activations, every layout, against the references; gradients
on a subset."""
import torch
import torch.nn.functional as F

from leanformer.ops import predicted_sparse_mlp, sparse_down_projection, topk_activation, topk_mlp
from leanformer.reference import (predicted_sparse_mlp_reference, sparse_down_projection_reference,
                                  topk_activation_reference)
from tests.fuzz.fuzzing import ALL_DTYPES, double, fuzz, grads_of, leaf
from tests.helpers import tolerance

ACT = {"relu": F.relu, "gelu": F.gelu}


def lead_shape(case):
    return tuple(case.size(f"lead{i}", 10, special=(8, 9)) for i in range(case.rng.randint(1, 2)))


def mlp(case, lead, d_model, d_ff, dtype):
    """x and the MLP's weights at init scale, each in a random layout (biases maybe None)."""
    x = case.layout("x", case.randn(*lead, d_model, dtype=dtype))
    w_up = case.layout("w_up", case.randn(d_ff, d_model, dtype=dtype, scale=max(d_model, 1) ** -0.5))
    w_down_t = case.layout("w_down_t", case.randn(d_ff, d_model, dtype=dtype, scale=max(d_ff, 1) ** -0.5))
    b_up = case.layout("b_up", case.randn(d_ff, dtype=dtype, scale=0.1)) if case.coin("b_up") else None
    b_down = case.layout("b_down", case.randn(d_model, dtype=dtype, scale=0.1)) if case.coin("b_down") else None
    return [x, w_up, b_up, w_down_t, b_down]


@fuzz("topk_activation")
def test_topk_activation(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    activation = case.pick("activation", ["relu", "gelu"])
    lead = lead_shape(case)
    d_ff = case.size("d_ff", 1100, lo=1, special=(1023, 1024, 1025))
    k = case.pick("k", [0, 1, d_ff, case.rng.randint(0, d_ff)])
    scale = case.pick("scale", [2.0, 1e-3])
    h = case.randn(*lead, d_ff, scale=scale)
    if case.coin("ties", 0.2):  # many equal values: ties go to the lowest index
        h = torch.randint(-3, 4, h.shape, generator=case.gen).float()
    h = case.layout("h", h.to(dtype))
    values, indices = topk_activation(h, k, activation=activation)
    ref_values, ref_indices = topk_activation_reference(h.contiguous(), k, activation)
    assert values.dtype == dtype and indices.dtype == torch.long and values.shape == (*lead, k)
    assert torch.equal(indices, ref_indices), "indices"
    assert torch.equal(values, ref_values), "values"
    if case.grads():
        go = case.randn(*lead, k, dtype=dtype)
        hl = leaf(h)
        (grad,) = grads_of(topk_activation(hl, k, activation=activation)[0], [hl], go)
        hr = leaf(double(h))
        (want,) = grads_of(ACT[activation](hr).gather(-1, indices), [hr], go.double())
        case.close(grad, want, dtype, "grad_h")


@fuzz("sparse_down_projection")
def test_sparse_down_projection(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    lead = lead_shape(case)
    d_ff = case.size("d_ff", 300, lo=1)
    d_model = case.size("d_model", 140, special=(8, 64, 65))
    k = case.size("k", min(d_ff, 60))  # repeats allowed, but at most d_ff entries per row
    values = case.layout("values", case.randn(*lead, k, dtype=dtype))
    indices = case.layout("indices", case.randint(0, d_ff, (*lead, k)))  # repeats add up
    w = case.layout("w_down_t", case.randn(d_ff, d_model, dtype=dtype))
    b = case.layout("bias", case.randn(d_model, dtype=dtype)) if case.coin("bias") else None
    y = sparse_down_projection(values, indices, w, b)
    y_ref = sparse_down_projection_reference(double(values), indices, double(w), double(b))
    assert y.dtype == dtype and y.shape == (*lead, d_model)
    case.close(y, y_ref, dtype, "y")
    if case.grads():
        leaves, ref_leaves = [leaf(t) for t in (values, w, b)], [leaf(double(t)) for t in (values, w, b)]
        go = case.randn(*lead, d_model, dtype=dtype)
        got = grads_of(sparse_down_projection(leaves[0], indices, leaves[1], leaves[2]), leaves, go)
        want = grads_of(sparse_down_projection_reference(ref_leaves[0], indices, ref_leaves[1], ref_leaves[2]),
                        ref_leaves, go.double())
        for name, g, r in zip(("grad_values", "grad_w_down_t", "grad_bias"), got, want):
            if r is not None:
                case.close(g, r, dtype, name)


@fuzz("topk_mlp")
def test_topk_mlp(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    activation = case.pick("activation", ["relu", "gelu"])
    lead = lead_shape(case)
    d_model = case.size("d_model", 100, special=(64, 65))
    d_ff = case.size("d_ff", 300, lo=1, special=(256, 257))
    k = case.pick("k", [0, 1, d_ff, case.rng.randint(0, d_ff)])
    inputs = mlp(case, lead, d_model, d_ff, dtype)
    y, indices = topk_mlp(*inputs, k, activation=activation, return_indices=True)
    assert y.dtype == dtype and y.shape == inputs[0].shape and indices.shape == (*lead, k)
    # The selection: the k largest act(h) of h computed in x's dtype (as F.linear rounds it), up to
    # the rounding of h between the kernels' GEMM and F.linear's: a near-tie may go either way.
    x, w_up, b_up, w_down_t, b_down = inputs
    a = ACT[activation](F.linear(x.contiguous(), w_up, b_up)).double()
    if k:
        assert (indices[..., 1:] > indices[..., :-1]).all(), "indices strictly ascending"
        assert ((indices >= 0) & (indices < d_ff)).all(), "indices in [0, d_ff)"
        chosen = a.gather(-1, indices)
        rest = a.scatter(-1, indices, -float("inf"))
        slack = 4 * tolerance(dtype) * a.abs().amax(-1, keepdim=True).clamp_min(1)
        assert (chosen.amin(-1, keepdim=True) >= rest.amax(-1, keepdim=True) - slack).all(), "not a top-k set"
    # The output and gradients: the MLP on the selected neurons, in fp64.
    ref = lambda *t: predicted_sparse_mlp_reference(*t, indices, activation)
    y_ref = ref(*(double(t) for t in inputs))
    case.close(y, y_ref, dtype, "y")
    if case.grads():
        go = case.randn(*lead, d_model, dtype=dtype)
        leaves, ref_leaves = [leaf(t) for t in inputs], [leaf(double(t)) for t in inputs]
        got = grads_of(topk_mlp(*leaves, k, activation=activation), leaves, go)
        want = grads_of(ref(*ref_leaves), ref_leaves, go.double())
        for name, g, r in zip(("x", "w_up", "b_up", "w_down_t", "b_down"), got, want):
            if r is not None:
                case.close(g, r, dtype, f"grad {name}")


@fuzz("predicted_sparse_mlp")
def test_predicted_sparse_mlp(case):
    dtype = case.pick("dtype", ALL_DTYPES)
    activation = case.pick("activation", ["relu", "gelu"])
    lead = lead_shape(case)
    d_model = case.size("d_model", 100, special=(64, 65))
    d_ff = case.size("d_ff", 300, lo=1, special=(16, 17))
    k = case.pick("k", [0, 1, d_ff, case.rng.randint(0, d_ff)])
    inputs = mlp(case, lead, d_model, d_ff, dtype)
    if case.coin("repeats"):
        idx = case.randint(0, d_ff, (*lead, k))
    else:
        idx = torch.rand(*lead, d_ff, generator=case.gen).argsort(-1)[..., :k]
    idx = case.layout("indices", idx)
    y = predicted_sparse_mlp(*inputs, idx, activation=activation)
    ref = lambda *t: predicted_sparse_mlp_reference(*t, idx, activation)
    y_ref = ref(*(double(t) for t in inputs))
    assert y.dtype == dtype and y.shape == inputs[0].shape
    case.close(y, y_ref, dtype, "y")
    if case.grads():
        go = case.randn(*lead, d_model, dtype=dtype)
        leaves, ref_leaves = [leaf(t) for t in inputs], [leaf(double(t)) for t in inputs]
        got = grads_of(predicted_sparse_mlp(*leaves, idx, activation=activation), leaves, go)
        want = grads_of(ref(*ref_leaves), ref_leaves, go.double())
        for name, g, r in zip(("x", "w_up", "b_up", "w_down_t", "b_down"), got, want):
            if r is not None:
                case.close(g, r, dtype, f"grad {name}")
