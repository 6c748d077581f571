"""Fuzz rep_batchnorm, progressive_norm and their synchronized forms (on a one-rank gloo group,
where they equal the local training forward): any leading shape, channels from 1, training or
eval, masks (also with one or no counted token), every layout of x, the mask and the parameters,
against the fp64 references, running statistics included; gradients on a subset."""
import pytest
import torch
import torch.distributed as dist

from leanformer.ops import progressive_norm, rep_batchnorm, sync_progressive_norm, sync_rep_batchnorm
from leanformer.reference import progressive_norm_reference, rep_batchnorm_reference
from tests.fuzz.fuzzing import ALL_DTYPES, double, fuzz, grads_of, leaf

# dx takes the batch's column means and the parameters' gradients sum over every token: the
# family's tests allow 5x the shared tolerance there, and half of it for y.
Y_SCALE, GRAD_SCALE = 0.5, 5


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group for the synchronized ops, gone after this module."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def norm_case(case, progressive, training=None):
    dtype = case.pick("dtype", ALL_DTYPES)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    lead = tuple(case.size(f"lead{i}", 9, special=(2, 3)) for i in range(case.rng.randint(1, 3)))
    C = case.size("C", 40, lo=1, special=(8, 16, 33))
    training = case.coin("training") if training is None else training
    x = case.layout("x", case.randn(*lead, C, scale=3, shift=1).to(dtype))
    mask = case.layout("mask", case.rand(*lead) > 0.3) if case.coin("masked") else None
    p = dict(bn_weight=case.rand(C, dtype=pd) + 0.5, bn_bias=case.randn(C, dtype=pd),
             alpha=case.pick("alpha", [torch.tensor([0.7], dtype=pd), torch.tensor(0.7, dtype=pd)]))
    if progressive:
        p.update(ln_weight=case.rand(C, dtype=pd) + 0.5, ln_bias=case.randn(C, dtype=pd))
    p = {k: case.layout(k, v) for k, v in p.items()}
    stats_layouts = dict(expand_dims=[]) if training else {}  # updated in place when training
    rm = case.layout("running_mean", case.randn(C, dtype=pd), **stats_layouts)
    rv = case.layout("running_var", case.rand(C, dtype=pd) + 0.5, **stats_layouts)
    gamma = case.pick("gamma", [0.0, 0.3, 1.0]) if progressive else 0.0
    return dtype, pd, x, mask, p, rm, rv, gamma, training


def counted(x, mask):
    return x.numel() // x.shape[-1] if mask is None else int(mask.sum())


def check(case, fn, ref, x, mask, p, rm, rv, dtype, pd, training):
    """fn(x, params, rm, rv) against ref(...) in fp64: y, the running statistics, and on a subset
    the gradients of x and every parameter."""
    if training and counted(x, mask) <= 1:
        with pytest.raises((RuntimeError, ValueError), match="more than one"):
            fn(x, p, rm, rv)
        return
    rm2, rv2 = double(rm).clone(), double(rv).clone()
    grads = case.grads()
    leaves = {k: leaf(v) if grads else v for k, v in p.items()}
    ref_leaves = {k: leaf(double(v)) if grads else double(v) for k, v in p.items()}
    xl, xr = (leaf(x), leaf(double(x))) if grads else (x, double(x))
    y = fn(xl, leaves, rm, rv)
    y_ref = ref(xr, ref_leaves, rm2, rv2)
    assert y.dtype == dtype and y.shape == x.shape
    case.close(y, y_ref, dtype, "y", scale=Y_SCALE)
    torch.testing.assert_close(rm.double(), rm2, rtol=1e-5, atol=1e-6, msg="running_mean")
    torch.testing.assert_close(rv.double(), rv2, rtol=1e-5, atol=1e-6, msg="running_var")
    if grads:
        g = case.randn(*x.shape, dtype=dtype)  # the same rounded grad_y on both sides
        names = ["x", *leaves]
        got = grads_of(y, [xl, *leaves.values()], g)
        want = grads_of(y_ref, [xr, *ref_leaves.values()], g.double())
        for name, a, b in zip(names, got, want):
            case.close(a, b, dtype, f"d{name}", scale=GRAD_SCALE)


@fuzz("rep_batchnorm")
def test_rep_batchnorm(case):
    dtype, pd, x, mask, p, rm, rv, _, training = norm_case(case, progressive=False)
    check(case,
          lambda x, p, rm, rv: rep_batchnorm(x, p["bn_weight"], p["bn_bias"], p["alpha"], rm, rv,
                                             training=training, mask=mask),
          lambda x, p, rm, rv: rep_batchnorm_reference(x, p["bn_weight"], p["bn_bias"], p["alpha"], rm, rv,
                                                       training=training, mask=mask),
          x, mask, p, rm, rv, dtype, pd, training)


@fuzz("progressive_norm")
def test_progressive_norm(case):
    dtype, pd, x, mask, p, rm, rv, gamma, training = norm_case(case, progressive=True)
    check(case,
          lambda x, p, rm, rv: progressive_norm(x, **p, running_mean=rm, running_var=rv, gamma=gamma,
                                                training=training, mask=mask),
          lambda x, p, rm, rv: progressive_norm_reference(x, **p, running_mean=rm, running_var=rv, gamma=gamma,
                                                          training=training, mask=mask),
          x, mask, p, rm, rv, dtype, pd, training)


@fuzz("sync_rep_batchnorm", weight=0.5)
def test_sync_rep_batchnorm(case, one_rank_group):
    dtype, pd, x, mask, p, rm, rv, _, _ = norm_case(case, progressive=False, training=True)
    check(case,
          lambda x, p, rm, rv: sync_rep_batchnorm(x, p["bn_weight"], p["bn_bias"], p["alpha"], rm, rv, mask=mask),
          lambda x, p, rm, rv: rep_batchnorm_reference(x, p["bn_weight"], p["bn_bias"], p["alpha"], rm, rv,
                                                       training=True, mask=mask),
          x, mask, p, rm, rv, dtype, pd, True)


@fuzz("sync_progressive_norm", weight=0.5)
def test_sync_progressive_norm(case, one_rank_group):
    dtype, pd, x, mask, p, rm, rv, gamma, _ = norm_case(case, progressive=True, training=True)
    check(case,
          lambda x, p, rm, rv: sync_progressive_norm(x, **p, running_mean=rm, running_var=rv, gamma=gamma,
                                                     mask=mask),
          lambda x, p, rm, rv: progressive_norm_reference(x, **p, running_mean=rm, running_var=rv, gamma=gamma,
                                                          training=True, mask=mask),
          x, mask, p, rm, rv, dtype, pd, True)
