"""Fuzz rms_norm (CPU): every dtype (float32 or x's dtype for the weight), layout of x and
weight, widths around the 16-lane vectors, row counts with leading dims, eps and scales from
tiny to large, against its reference; rows independent of the batch bit for bit; gradients
against the reference's in fp64."""
import torch

from leanformer.ops import rms_norm
from leanformer.reference import rms_norm_reference
from tests.fuzz.fuzzing import double, fuzz, grads_of, leaf

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@fuzz("rms_norm")
def test_rms_norm(case):
    dtype = case.pick("dtype", DTYPES)
    rows = case.pick("rows", [(0,), (1,), (1, 1), (case.rng.randint(2, 70),), (2, case.rng.randint(0, 9)),
                              (3, 2, case.rng.randint(1, 5))])
    C = case.size("C", 1100, special=(1, 15, 16, 17, 31, 32, 33, 576))
    eps = case.pick("eps", [0.0, 1e-6, 1e-5, 0.3])
    # x's scale: 1e-3 with eps = 1e-6 makes eps a visible part of the sum
    x = case.layout("x", case.randn(*rows, C, scale=case.pick("x scale", [1e-3, 1.0, 50.0])).to(dtype))
    w = case.layout("weight", case.randn(C).to(case.pick("weight dtype", [dtype, torch.float32])))
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    case.close(y, rms_norm_reference(x, w, eps), dtype, "y")
    if x.dim() >= 2 and x.shape[0] > 1 and y.numel():
        assert torch.equal(rms_norm(x[1:], w, eps), y[1:]), "a row's result depends on the other rows"
    if case.grads() and x.numel() and eps > 0:
        g = case.randn(*x.shape).double()
        xd, wd = leaf(double(x)), leaf(double(w))
        got = grads_of(rms_norm(xd, wd, eps), [xd, wd], g)
        xr, wr = leaf(double(x)), leaf(double(w))
        want = grads_of(rms_norm_reference(xr, wr, eps), [xr, wr], g)
        for a, b, name in zip(got, want, ("grad_x", "grad_w")):
            case.close(a, b, torch.float64, name, scale=1e3)  # the backward's formula, not autograd's: fp64 rounding
