"""rep_batchnorm and nn.RepBN against the eager reference (CPU kernels; no CUDA kernel yet)."""
import pytest
import torch

from leanformer.nn import RepBN
from leanformer.ops import rep_batchnorm
from leanformer.reference import rep_batchnorm_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def params(C, dtype=torch.float32):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, dtype=pd) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=pd).requires_grad_(True)
    alpha = torch.tensor([0.7], dtype=pd).requires_grad_(True)
    rm, rv = torch.randn(C, dtype=pd), torch.rand(C, dtype=pd) + 0.5
    return w, b, alpha, rm, rv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 17, 5), (64, 33), (2, 3, 4, 7)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(dtype, shape, training, masked):
    x = (torch.randn(shape) * 3 + 1).to(dtype).requires_grad_(True)
    mask = torch.rand(shape[:-1]) > 0.3 if masked else None
    w, b, alpha, rm, rv = params(shape[-1], dtype)
    leaves = [w, b, alpha]
    w2, b2, alpha2 = (t.detach().clone().requires_grad_(True) for t in leaves)
    rm2, rv2 = rm.clone(), rv.clone()
    x2 = x.detach().double().requires_grad_(True)

    y = rep_batchnorm(x, w, b, alpha, rm, rv, training=training, mask=mask)
    y_ref = rep_batchnorm_reference(x2, w2.double(), b2.double(), alpha2.double(), rm2.double(),
                                    rv2.double(), training=training, mask=mask)
    assert y.dtype == dtype
    tol = TOL[dtype]
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() <= tol * scale
    g = torch.randn(shape, dtype=torch.float64)
    torch.autograd.backward(y, g.to(dtype))
    torch.autograd.backward(y_ref, g)
    for name, a, r in (("x", x, x2), ("weight", w, w2), ("bias", b, b2), ("alpha", alpha, alpha2)):
        err = (a.grad.double() - r.grad).abs().max() / r.grad.abs().max().clamp_min(1)
        assert err <= max(tol, 1e-5) * (50 if dtype == torch.bfloat16 else 10), f"d{name}: {err}"


def test_running_statistics_follow_batchnorm():
    x = torch.randn(8, 20, 6) * 2 + 3
    bn = torch.nn.BatchNorm1d(6)
    m = RepBN(6)
    for _ in range(3):
        bn(x.reshape(-1, 6))
        m(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert m.num_batches_tracked.item() == 3
    m.eval(), bn.eval()
    torch.testing.assert_close(m(x), bn(x.reshape(-1, 6)).view_as(x) + x)


def test_mask_excludes_padding_from_statistics():
    x = torch.randn(4, 10, 5)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 7:] = False
    padded = x.clone()
    padded[:, 7:] = 1e4  # garbage in the padding must not move the statistics
    m1, m2 = RepBN(5), RepBN(5)
    y1 = m1(x, mask=mask)
    y2 = m2(padded, mask=mask)
    torch.testing.assert_close(y1[:, :7], y2[:, :7])
    torch.testing.assert_close(m1.running_mean, m2.running_mean)
    torch.testing.assert_close(m1.running_var, m2.running_var)


def test_gradcheck():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 3) > 0.3
    for training in (True, False):
        for msk in (None, mask):
            w, b, alpha, rm, rv = params(4, torch.float64)
            torch.autograd.gradcheck(
                lambda x, w, b, a: rep_batchnorm(x, w, b, a, rm.clone(), rv.clone(), training=training, mask=msk),
                (x, w, b, alpha))


def test_opcheck_and_compile():
    x = torch.randn(6, 7, 8, requires_grad=True)
    w, b, alpha, rm, rv = params(8)
    for training in (True, False):
        torch.library.opcheck(torch.ops.leanformer.rep_batchnorm.default,
                              (x, w, b, alpha, rm, rv, training, 1e-5, torch.rand(6, 7) > 0.2))
    m = RepBN(8)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, rep_batchnorm_reference(x, m.weight, m.bias, m.alpha, torch.zeros(8), torch.ones(8), training=True))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 6, 8)
    w, b, alpha, rm, rv = params(8)
    call = lambda **kw: rep_batchnorm(**{**dict(x=x, weight=w, bias=b, alpha=alpha, running_mean=rm,
                                                running_var=rv, training=True), **kw})
    cases = [
        (dict(weight=torch.ones(7)), "weight must have shape \\[C\\] = \\[8\\]"),
        (dict(bias=torch.ones(8, 1)), "bias must have shape \\[C\\] = \\[8\\]"),
        (dict(running_var=torch.ones(9)), "running_var must have shape \\[C\\] = \\[8\\]"),
        (dict(alpha=torch.ones(2)), "alpha must hold one value"),
        (dict(weight=torch.ones(8, dtype=torch.float64)), "weight must be Float"),
        (dict(mask=torch.ones(4, 5, dtype=torch.bool)), "mask must have the leading shape of x"),
        (dict(mask=torch.ones(4, 6)), "mask must be bool"),
        (dict(x=torch.randn(1, 8)), "more than one token per channel"),
        (dict(mask=torch.zeros(4, 6, dtype=torch.bool)), "more than one unmasked token"),
    ]
    for kw, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            call(**kw)
    m = RepBN(8).eval()
    with pytest.raises(RuntimeError, match="RepBN in eval has no running statistics"):
        m(x)
    with pytest.raises(ValueError, match="x must be \\[..., 8\\]"):
        RepBN(8)(torch.randn(3, 7))
