"""progressive_norm against the eager reference on every device in DEVICES, its gradcheck,
opcheck and bad inputs (nn.PRepBN itself: tests/nn/test_rep_batchnorm.py)."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.nn import PRepBN
from leanformer.ops import progressive_norm, rep_batchnorm
from leanformer.reference import progressive_norm_reference
from tests.helpers import DEVICES, GPU_DEVICES, assert_close, device_dtypes, skip_on_emu


def make_params(C, dtype=torch.float32, device="cpu"):
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    mk = lambda t: t.to(device=device, dtype=pd).requires_grad_(True)
    return dict(ln_weight=mk(torch.rand(C) + 0.5), ln_bias=mk(torch.randn(C)),
                bn_weight=mk(torch.rand(C) + 0.5), bn_bias=mk(torch.randn(C)),
                alpha=mk(torch.tensor([0.6]))), (torch.randn(C, dtype=pd, device=device),
                                                 torch.rand(C, dtype=pd, device=device) + 0.5)


@pytest.mark.parametrize("device,dtype", device_dtypes(fp64=True))
@pytest.mark.parametrize("shape", [(3, 21, 10), (4, 65, 32)])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(device, dtype, shape, gamma, training, masked):
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).requires_grad_(True)
    mask = torch.rand(shape[:-1], device=device) > 0.3 if masked else None
    p, (rm, rv) = make_params(shape[-1], dtype, device)
    p2 = {k: v.detach().double().requires_grad_(True) for k, v in p.items()}
    rm2, rv2 = rm.double().clone(), rv.double().clone()
    x2 = x.detach().double().requires_grad_(True)
    y = progressive_norm(x, **p, running_mean=rm, running_var=rv, gamma=gamma, training=training, mask=mask)
    y_ref = progressive_norm_reference(x2, **p2, running_mean=rm2, running_var=rv2, gamma=gamma,
                                       training=training, mask=mask)
    assert_close(y, y_ref, dtype, "y")
    torch.testing.assert_close(rm.double(), rm2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv2, rtol=1e-5, atol=1e-6)
    g = torch.randn(shape, dtype=torch.float64, device=device)
    torch.autograd.backward(y, g.to(dtype))
    torch.autograd.backward(y_ref, g)
    # The parameters' gradients are sums over every token, dx takes the batch's column means.
    for name, a, r in [("x", x, x2)] + [(k, p[k], p2[k]) for k in p]:
        assert_close(a.grad, r.grad, dtype, f"d{name}", scale=5)


@pytest.mark.parametrize("device", DEVICES)
def test_layernorm_of_rows_of_equal_values(device):
    """A row of equal values has mean x and LayerNorm output ln_bias exactly; the row mean summed
    plainly in fp32 was off by a rounding that 1 / sqrt(ln_eps) amplified to ~1e-4."""
    x = (torch.randn(6, 1, device=device) * 50).expand(6, 33).contiguous()
    p, (rm, rv) = make_params(33, device=device)
    y = progressive_norm(x, **p, running_mean=rm, running_var=rv, gamma=1.0, training=False)
    torch.testing.assert_close(y, p["ln_bias"].detach().expand(6, 33), rtol=0, atol=1e-6)


def test_gamma_endpoints_are_layernorm_and_repbn():
    x = torch.randn(4, 9, 12)
    p, (rm, rv) = make_params(12)
    with torch.no_grad():
        y1 = progressive_norm(x, **p, running_mean=rm.clone(), running_var=rv.clone(), gamma=1.0, training=True)
        y0 = progressive_norm(x, **p, running_mean=rm.clone(), running_var=rv.clone(), gamma=0.0, training=True)
        bn = rep_batchnorm(x, p["bn_weight"], p["bn_bias"], p["alpha"], rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(y1, F.layer_norm(x, (12,), p["ln_weight"], p["ln_bias"]), atol=1e-6, rtol=1e-6)
    assert torch.equal(y0, bn)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(4, 3, device=device) > 0.3
    for gamma, training, msk in [(0.4, True, None), (0.4, True, mask), (0.7, False, None), (1.0, True, None)]:
        p, (rm, rv) = make_params(5, torch.float64, device)
        names = list(p)
        torch.autograd.gradcheck(
            lambda x, *ps: progressive_norm(x, **dict(zip(names, ps)), running_mean=rm.clone(),
                                            running_var=rv.clone(), gamma=gamma, training=training, mask=msk),
            (x, *p.values()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    x = torch.randn(6, 7, 8, device=device, requires_grad=True)
    p, (rm, rv) = make_params(8, device=device)
    for gamma, training in [(0.5, True), (0.2, False)]:
        torch.library.opcheck(torch.ops.leanformer.progressive_norm.default,
                              (x, *p.values(), rm, rv, gamma, training, 1e-5, 1e-5,
                               torch.rand(6, 7, device=device) > 0.2))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 6, 8)
    p, (rm, rv) = make_params(8)
    with pytest.raises(RuntimeError, match="gamma must be in \\[0, 1\\]"):
        progressive_norm(x, **p, running_mean=rm, running_var=rv, gamma=1.5, training=True)
    with pytest.raises(RuntimeError, match="ln_weight must have shape \\[C\\] = \\[8\\]"):
        progressive_norm(x, **{**p, "ln_weight": torch.ones(7)}, running_mean=rm, running_var=rv,
                         gamma=0.5, training=True)
    with pytest.raises(ValueError, match="x must be \\[..., 8\\]"):
        PRepBN(8, 10)(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="RepBN in eval has no running statistics"):
        PRepBN(8, 10).eval()(x)
    with pytest.raises(ValueError, match="total_steps"):
        PRepBN(8, -1)


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_large_batch_matches_reference_and_reruns_bitwise(masked, device):
    """64 x 197 tokens of 384 channels: many row blocks in the column reductions, 16-byte
    packs in the row passes; the reductions use no atomics, so a rerun is bitwise equal."""
    shape = (64, 197, 384)
    x = (torch.randn(shape, device=device) * 2 + 3).requires_grad_(True)
    mask = torch.rand(shape[:-1], device=device) > 0.2 if masked else None
    p, (rm, rv) = make_params(384, device=device)
    g = torch.randn(shape, device=device)
    runs = []
    for _ in range(2):
        for t in [x, *p.values()]:
            t.grad = None
        y = progressive_norm(x, **p, running_mean=rm.clone(), running_var=rv.clone(), gamma=0.3,
                             training=True, mask=mask)
        y.backward(g)
        runs.append([y.detach()] + [t.grad.clone() for t in [x, *p.values()]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    p2 = {k: v.detach().double().requires_grad_(True) for k, v in p.items()}
    x2 = x.detach().double().requires_grad_(True)
    y_ref = progressive_norm_reference(x2, **p2, running_mean=rm.double(), running_var=rv.double(),
                                       gamma=0.3, training=True, mask=mask)
    y_ref.backward(g.double())
    assert_close(runs[0][0], y_ref, torch.float32, "y")
    for name, a, r in [("x", runs[0][1], x2.grad)] + [(k, v, p2[k].grad) for k, v in zip(p, runs[0][2:])]:
        assert_close(a, r, torch.float32, f"d{name}", scale=5)
