"""rep_batchnorm against the eager reference on every device in DEVICES, its gradcheck, opcheck,
compile and bad inputs (nn.RepBN itself: tests/nn/test_rep_batchnorm.py)."""
import pytest
import torch

from leanformer.nn import RepBN
from leanformer.ops import rep_batchnorm
from leanformer.reference import rep_batchnorm_reference
from tests.helpers import DEVICES, GPU_DEVICES, assert_close, device_dtypes, skip_on_emu


def params(C, dtype=torch.float32, device="cpu"):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    leaf = lambda t: t.to(device=device, dtype=pd).requires_grad_(True)
    w, b, alpha = leaf(torch.rand(C) + 0.5), leaf(torch.randn(C)), leaf(torch.tensor([0.7]))
    rm, rv = torch.randn(C, dtype=pd, device=device), torch.rand(C, dtype=pd, device=device) + 0.5
    return w, b, alpha, rm, rv


@pytest.mark.parametrize("device,dtype", device_dtypes(fp64=True))
@pytest.mark.parametrize("shape", [(3, 17, 5), (64, 33), (2, 3, 4, 7), (6, 50, 24)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(device, dtype, shape, training, masked):
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype).requires_grad_(True)
    mask = torch.rand(shape[:-1], device=device) > 0.3 if masked else None
    w, b, alpha, rm, rv = params(shape[-1], dtype, device)
    leaves = [w, b, alpha]
    w2, b2, alpha2 = (t.detach().clone().requires_grad_(True) for t in leaves)
    rm2, rv2 = rm.clone(), rv.clone()
    x2 = x.detach().double().requires_grad_(True)

    y = rep_batchnorm(x, w, b, alpha, rm, rv, training=training, mask=mask)
    y_ref = rep_batchnorm_reference(x2, w2.double(), b2.double(), alpha2.double(), rm2.double(),
                                    rv2.double(), training=training, mask=mask)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", scale=0.5)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    torch.autograd.backward(y, g.to(dtype))
    torch.autograd.backward(y_ref, g)
    # The parameters' gradients are sums over every token, dx takes the batch's column means.
    for name, a, r in (("x", x, x2), ("weight", w, w2), ("bias", b, b2), ("alpha", alpha, alpha2)):
        assert_close(a.grad, r.grad, dtype, f"d{name}", scale=5)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_of_equal_values(device):
    """Every token equal (variance 0, invstd = 1 / sqrt(eps)): BN(x) = bias exactly, y = bias +
    alpha x. The forward computed x * w * invstd - mean * w * invstd, whose rounding invstd
    amplified (1e-3 here); it now takes x - mean first. Also |mean| >> std keeps fp32 accuracy."""
    x = (torch.randn(1, 8, device=device) * 50).expand(64, 8).contiguous().requires_grad_(True)
    w, b, _, rm, rv = params(8, device=device)
    alpha = torch.zeros(1, device=device)
    y = rep_batchnorm(x, w, b, alpha, rm, rv, training=True)
    torch.testing.assert_close(y, b.detach().expand(64, 8), rtol=0, atol=1e-6)
    x = (1000 + torch.randn(64, 8, device=device)).requires_grad_(True)
    y = rep_batchnorm(x, w, b, alpha, rm, rv, training=True)
    x2 = x.detach().double().requires_grad_(True)
    y_ref = rep_batchnorm_reference(x2, w.double(), b.double(), alpha.double(), rm.double(), rv.double(),
                                    training=True)
    assert_close(y, y_ref, torch.float32, "y", scale=0.5)
    g = torch.randn(64, 8, device=device)
    (dx,) = torch.autograd.grad(y, [x], g)
    (dx_ref,) = torch.autograd.grad(y_ref, [x2], g.double())
    assert_close(dx, dx_ref, torch.float32, "dx", scale=5)


@pytest.mark.parametrize("device", DEVICES)
def test_equal_counted_values_with_far_uncounted_rows(device):
    """Two counted tokens equal in a channel (variance 0, invstd = 1 / sqrt(eps)) and uncounted
    tokens far from them: mean(dy * xhat) over the batch is large, and dx's statistics term
    x * k2 + k3 cancelled to 7% of dx in fp32 (the fuzz suite's progressive_norm case 53)."""
    x = torch.randn(4, 31, device=device) * 3 + 1
    x[3, ::3] = x[2, ::3]
    x.requires_grad_(True)
    mask = torch.tensor([False, False, True, True], device=device)
    w, b, alpha, rm, rv = params(31, device=device)
    y = rep_batchnorm(x, w, b, alpha, rm, rv, training=True, mask=mask)
    x2 = x.detach().double().requires_grad_(True)
    y_ref = rep_batchnorm_reference(x2, w.double(), b.double(), alpha.double(), rm.double(), rv.double(),
                                    training=True, mask=mask)
    g = torch.randn(4, 31, device=device)
    (dx,) = torch.autograd.grad(y, [x], g)
    (dx_ref,) = torch.autograd.grad(y_ref, [x2], g.double())
    assert_close(dx, dx_ref, torch.float32, "dx", scale=5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("strided", ["weight", "running_mean", "running_var"])
def test_strided_parameters_give_the_same_gradients(training, strided):
    """The op and the reference with a strided weight or running statistic agree with the
    contiguous ones. F.batch_norm's CPU backward (which the reference ran on them) read such a
    weight, and in eval such statistics, as if contiguous: wrong grad_x and grad_weight."""
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    w, b, alpha, rm, rv = params(8, torch.float64)
    g = torch.randn(6, 5, 8, dtype=torch.float64)
    results = []
    for fn in (rep_batchnorm, rep_batchnorm_reference):
        for layout in ("contiguous", "strided"):
            args = dict(weight=w.detach().clone(), bias=b.detach().clone(), running_mean=rm.clone(),
                        running_var=rv.clone())
            if layout == "strided":
                args[strided] = torch.zeros(8, 2, dtype=torch.float64).copy_(args[strided][:, None])[:, 0]
                assert args[strided].stride() == (2,)
            xl, wl = x.clone().requires_grad_(True), args["weight"].requires_grad_(True)
            y = fn(xl, wl, args["bias"], alpha.detach(), args["running_mean"], args["running_var"], training=training)
            results.append((fn.__name__, layout, y, *torch.autograd.grad(y, [xl, wl], g)))
    want = results[0]
    for name, layout, *got in results[1:]:
        for what, a, r in zip(("y", "dx", "dweight"), got, want[2:]):
            torch.testing.assert_close(a, r, msg=f"{name} {layout} {strided}: {what}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(5, 3, device=device) > 0.3
    for training in (True, False):
        for msk in (None, mask):
            w, b, alpha, rm, rv = params(4, torch.float64, device)
            torch.autograd.gradcheck(
                lambda x, w, b, a: rep_batchnorm(x, w, b, a, rm.clone(), rv.clone(), training=training, mask=msk),
                (x, w, b, alpha))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    x = torch.randn(6, 7, 8, device=device, requires_grad=True)
    w, b, alpha, rm, rv = params(8, device=device)
    for training in (True, False):
        torch.library.opcheck(torch.ops.leanformer.rep_batchnorm.default,
                              (x, w, b, alpha, rm, rv, training, 1e-5, torch.rand(6, 7, device=device) > 0.2))
    m = RepBN(8).to(device)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, rep_batchnorm_reference(x, m.weight, m.bias, m.alpha, torch.zeros(8, device=device),
                                                          torch.ones(8, device=device), training=True))
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


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_cuda_mask_with_one_token_gives_nan_statistics(device):
    """The CPU kernel raises; the CUDA one would need a device sync to read the mask's count,
    so it returns NaN statistics instead (the unmasked case is still checked from the shape)."""
    x = torch.randn(4, 6, 8, device=device)
    w, b, alpha, rm, rv = params(8, device=device)
    mask = torch.zeros(4, 6, dtype=torch.bool, device=device)
    mask[1, 2] = True
    y, mean, invstd = torch.ops.leanformer.rep_batchnorm(x, w, b, alpha, rm, rv, True, 1e-5, mask)
    assert mean.isnan().all() and invstd.isnan().all() and y.isnan().all()
    with pytest.raises(RuntimeError, match="more than one token per channel"):
        rep_batchnorm(torch.randn(1, 8, device=device), w, b, alpha, rm, rv, training=True)
