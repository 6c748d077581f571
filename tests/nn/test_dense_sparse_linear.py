"""DenseSparseLinear (DSFormer's D x N:M-sparse S layer), its initialization from a trained
Linear, NMSparseLinear, LowRankLinear and the Straight-Through Factorizer."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanformer.nn import DenseSparseLinear, LowRankLinear, NMSparseLinear, StraightThroughFactorizer
from leanformer.nn.dense_sparse_factorization import factorize
from leanformer.sparse import nm_mask
from tests.helpers import TORCH_DEVICES as DEVICES, device_dtypes, tolerance, trained_like

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2)]


def linear_with(weight, bias=True):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def groups_ok(dense, n, m):
    return bool(((dense != 0).reshape(dense.shape[0], -1, m).sum(-1) <= n).all())


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("method", ["svd", "alternating"])
def test_factorization_reconstructs_within_reported_error(n, m, method):
    w = trained_like(40, 48)
    d, s, err = factorize(w, 12, n, m, method=method, iters=4)
    assert d.shape == (40, 12) and s.shape == (12, 48)
    assert groups_ok(s, n, m), "S must follow the N:M pattern"
    assert abs(rel(d @ s, w) - err) < 1e-5
    assert 0 < err < 1


def test_alternating_is_never_worse_than_svd_and_improves_on_real_like_weights():
    w = trained_like(64, 96, decay=0.97)
    _, _, svd = factorize(w, 24, 2, 4, method="svd")
    _, _, alt = factorize(w, 24, 2, 4, method="alternating", iters=8)
    assert alt < svd * 0.99, (alt, svd)


@pytest.mark.parametrize("device,dtype", device_dtypes(devices=DEVICES))
@pytest.mark.parametrize("shape", [(37, 64, 9), (8, 24, 8), (100, 36, 1)])
def test_from_linear_forward_is_d_times_s(device, dtype, shape):
    out_f, in_f, rank = shape
    lin = linear_with(trained_like(out_f, in_f, device=device, dtype=dtype))
    layer, err = DenseSparseLinear.from_linear(lin, rank, n=2, m=4, iters=3)
    assert layer.init_error == err and layer.dense.weight.dtype == dtype
    x = torch.randn(3, 5, in_f, device=device, dtype=dtype)
    expected = F.linear(x.double(), layer.dense_weight().double(), lin.bias.double())
    y = layer(x)
    assert y.shape == (3, 5, out_f) and y.dtype == dtype
    assert rel(y, expected) < tolerance(dtype)  # norm-wise
    # the layer's weight is the factorization whose error was reported
    assert abs(rel(layer.dense_weight(), lin.weight.detach()) - err) < tolerance(dtype)


def test_gradcheck_fp64_through_values_and_d():
    lin = linear_with(trained_like(12, 16, dtype=torch.float64))
    layer, _ = DenseSparseLinear.from_linear(lin, 6, n=2, m=4)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    meta = layer.sparse.meta

    def f(x, values, d, b):
        return F.linear(torch.ops.leanformer.nm_sparse_linear(x, values, meta, None, n=2, m=4), d, b)

    params = [layer.sparse.values.detach().clone().requires_grad_(True),
              layer.dense.weight.detach().clone().requires_grad_(True),
              layer.dense.bias.detach().clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(f, (x, *params))


def test_fine_tuning_keeps_the_pattern_and_uses_the_values_gradient():
    lin = linear_with(trained_like(24, 32))
    layer, _ = DenseSparseLinear.from_linear(lin, 8)
    meta = layer.sparse.meta.clone()
    x, target = torch.randn(10, 32), torch.randn(10, 24)
    loss = F.mse_loss(layer(x), target)
    loss.backward()
    # the values' gradient is the dense gradient of S read at the kept positions
    s = layer.sparse.dense_weight().requires_grad_(True)
    F.mse_loss(F.linear(F.linear(x, s), layer.dense.weight.detach(), layer.dense.bias.detach()), target).backward()
    keep = s.detach() != 0
    assert torch.allclose(layer.sparse.values.grad.flatten().sort().values,
                          s.grad[keep].flatten().sort().values, atol=1e-6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(layer.sparse.meta, meta)
    assert F.mse_loss(layer(x), target) < loss


def test_state_dict_round_trip_through_torch_save():
    lin = linear_with(trained_like(24, 32))
    layer, _ = DenseSparseLinear.from_linear(lin, 8, n=1, m=4)
    assert set(layer.state_dict()) == {"sparse.values", "sparse.meta", "dense.weight", "dense.bias"}
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = DenseSparseLinear(32, 24, 8, n=1, m=4)
    x = torch.randn(4, 32)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    layer, _ = DenseSparseLinear.from_linear(linear_with(trained_like(24, 32, device=device)), 8)
    x = torch.randn(5, 32, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_bad_arguments_raise_clearly():
    lin = nn.Linear(32, 24)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(out, in\) = 24\]"):
        DenseSparseLinear.from_linear(lin, 25)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        DenseSparseLinear(32, 24, 0)
    with pytest.raises(ValueError, match="K=30 .* multiple of m=4"):
        DenseSparseLinear(30, 24, 4)
    with pytest.raises(ValueError, match="n must satisfy"):
        DenseSparseLinear(32, 24, 4, n=4, m=4)
    with pytest.raises(ValueError, match="method must be one of"):
        DenseSparseLinear.from_linear(lin, 4, method="qr")
    with pytest.raises(ValueError, match=r"d must be \[out, rank=8\]"):
        DenseSparseLinear.from_factors(torch.randn(24, 7), NMSparseLinear(32, 8).sparse())


@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_sparse_linear_module_is_the_pruned_linear(n, m):
    lin = nn.Linear(48, 20)
    layer = NMSparseLinear.from_linear(lin, n=n, m=m)
    w = lin.weight.detach()
    x = torch.randn(7, 48)
    torch.testing.assert_close(layer(x), F.linear(x, w * nm_mask(w, n, m), lin.bias), rtol=1e-5, atol=1e-5)
    assert layer.storage_bits() == layer.values.numel() * 32 + layer.meta.numel() * 32 + 20 * 32


def test_low_rank_linear_error_is_the_svd_tail():
    w = trained_like(30, 40)
    layer, err = LowRankLinear.from_linear(linear_with(w), 7)
    s = torch.linalg.svdvals(w.double())
    assert abs(err - (s[7:].square().sum() / s.square().sum()).sqrt().item()) < 1e-5
    x = torch.randn(4, 40)
    torch.testing.assert_close(layer(x), F.linear(x, layer.up.weight @ layer.down.weight, layer.up.bias))


# ---- the Straight-Through Factorizer ----

def test_stf_masks_are_nm_after_every_step_and_the_pattern_moves():
    torch.manual_seed(1)
    n, m = 2, 4
    stf, err = StraightThroughFactorizer.from_linear(linear_with(trained_like(24, 32)), 8, n=n, m=m)
    teacher = linear_with(torch.randn(24, 32))  # a different target: the pattern has to move
    opt = torch.optim.Adam(stf.parameters(), lr=3e-2)
    first_mask, losses, changed = stf.mask(), [], False
    for _ in range(30):
        x = torch.randn(16, 32)
        loss = F.mse_loss(stf(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        mask = stf.mask()
        assert bool((mask.reshape(8, -1, m).sum(-1) == n).all()), "every group keeps exactly n"
        assert groups_ok(stf.sparse_weight().detach(), n, m)
        changed |= not torch.equal(mask, first_mask)
    assert changed, "the pattern is chosen anew every step: training must move it"
    assert sum(losses[-5:]) < sum(losses[:5])


def test_stf_gradient_passes_straight_through_to_pruned_entries():
    stf, _ = StraightThroughFactorizer.from_linear(linear_with(trained_like(12, 16)), 6)
    x = torch.randn(5, 16)
    stf(x).square().sum().backward()
    s = stf.sparse_weight().detach().requires_grad_(True)
    stf.dense(F.linear(x, s)).square().sum().backward()
    torch.testing.assert_close(stf.latent.grad, s.grad)
    assert bool((stf.latent.grad[~stf.mask()] != 0).any())


def test_stf_finalize_equals_its_forward_and_starts_from_the_factorization():
    lin = linear_with(trained_like(24, 32))
    layer, _ = DenseSparseLinear.from_linear(lin, 8)
    stf = StraightThroughFactorizer.from_dense_sparse(layer)
    x = torch.randn(6, 32)
    torch.testing.assert_close(stf(x), layer(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stf.latent.add_(torch.randn_like(stf.latent) * 0.1)  # a new pattern and values
    final = stf.finalize()
    assert isinstance(final, DenseSparseLinear) and final.rank == 8
    assert stf.to_dense_sparse().state_dict().keys() == final.state_dict().keys()
    torch.testing.assert_close(final(x), stf(x), rtol=1e-5, atol=1e-5)
