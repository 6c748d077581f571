"""packed_linear (prepacked-weight linear for decoding on the CPU) against F.linear in fp64:
odd shapes, both dtypes, gradcheck, opcheck, torch.compile, bad inputs; the same for
packed_swiglu (the packed_linears context that swaps them into a model:
tests/nn/test_packed_linear_layers.py)."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.ops import pack_linear_weight, pack_swiglu_weight, packed_linear, packed_swiglu, unpack_linear_weight
from tests.helpers import assert_close, assert_compiles_like_eager

# rows: none; one (a decoding step); every block height of the AVX2 tiles (at most 6 rows, the
# blocks balanced: 2, 3, 5, 7 = 4 + 3); the AVX-512 linear's 12-row tile and its neighbours; a
# 19-node tree; several tiles
ROWS = [(0,), (1,), (2,), (3,), (5,), (7,), (11,), (12,), (13,), (19,), (77,), (3, 13)]
# (K, N): a partial panel below, at and above 32 columns, several panels with a partial last one
SIZES = [(1, 1), (7, 31), (16, 32), (33, 33), (256, 100), (100, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("K,N", SIZES)
def test_matches_linear(dtype, rows, K, N):
    for bias in (True, False):
        w = torch.randn(N, K, dtype=dtype)
        b = torch.randn(N, dtype=dtype) if bias else None
        x = torch.randn(*rows, K, dtype=dtype)
        y = packed_linear(x, pack_linear_weight(w), b, N)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert y.shape == (*rows, N) and y.dtype == dtype
        assert_close(y, ref, dtype, f"rows={rows} K={K} N={N} bias={bias}", scale=0.5)  # one short dot per output


def test_pack_roundtrip_and_layout():
    w = torch.randn(70, 9)
    p = pack_linear_weight(w)
    assert p.shape == (3, 9, 32)
    assert torch.equal(p[1, 4, 5], w[32 + 5, 4])
    assert torch.equal(p[2, :, 6:], torch.zeros(9, 26))  # zero past N
    assert torch.equal(unpack_linear_weight(p, 70), w)


def test_rows_do_not_change_each_others_results():
    # each row's sum runs in the same order whatever the tile, so a node of a 19-node tree gets
    # bit for bit what a one-token step gets: tree decoding verifies what plain decoding computes
    w, b = torch.randn(1024, 256), torch.randn(1024)
    p, x = pack_linear_weight(w), torch.randn(19, 256)
    full = packed_linear(x, p, b, 1024)
    for i in (0, 11, 12, 18):
        assert torch.equal(packed_linear(x[i:i + 1], p, b, 1024), full[i:i + 1])


@pytest.mark.parametrize("rows", [(0,), (3,), (2, 5)])
def test_no_input_features_differentiate(rows):
    """K = 0: y = bias and SwiGLU's y = 0, and their gradients (zeros, grad_bias the row count);
    the backward's reshape(-1, K) was ambiguous at K = 0 and raised."""
    x = torch.randn(*rows, 0, requires_grad=True)
    packed = pack_linear_weight(torch.randn(40, 0)).requires_grad_(True)
    b = torch.randn(40, requires_grad=True)
    y = packed_linear(x, packed, b, 40)
    torch.testing.assert_close(y, b.detach().expand(*rows, 40))
    gx, gp, gb = torch.autograd.grad(y, [x, packed, b], torch.ones_like(y))
    assert gx.shape == x.shape and gp.shape == packed.shape and torch.all(gp == 0)
    torch.testing.assert_close(gb, torch.full((40,), float(torch.Size(rows).numel())))
    packed = pack_swiglu_weight(torch.randn(33, 0), torch.randn(33, 0)).requires_grad_(True)
    y = packed_swiglu(x, packed, 33)
    assert torch.equal(y, torch.zeros(*rows, 33))
    gx, gp = torch.autograd.grad(y, [x, packed], torch.ones_like(y))
    assert gx.shape == x.shape and gp.shape == packed.shape and torch.all(gp == 0)


def test_non_contiguous_input():
    w = torch.randn(40, 24)
    x = torch.randn(24, 5).t()
    torch.testing.assert_close(packed_linear(x, pack_linear_weight(w), None, 40), F.linear(x, w))


def test_gradcheck():
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    p = pack_linear_weight(torch.randn(37, 13, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p, b: packed_linear(x, p, b, 37), (x, p, b))


def test_gradient_reaches_the_unpacked_weight():
    w = torch.randn(33, 8, requires_grad=True)
    x = torch.randn(4, 8)
    packed_linear(x, pack_linear_weight(w), None, 33).square().sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    F.linear(x, w2).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_opcheck():
    x = torch.randn(5, 20)
    p = pack_linear_weight(torch.randn(45, 20))
    torch.library.opcheck(torch.ops.leanformer.packed_linear.default, (x, p, torch.randn(45), 45))
    torch.library.opcheck(torch.ops.leanformer.packed_linear.default, (x, p, None, 45))


def test_compiles_fullgraph():
    x = torch.randn(2, 7, 20, requires_grad=True)
    p = pack_linear_weight(torch.randn(40, 20)).requires_grad_(True)
    b = torch.randn(40, requires_grad=True)
    assert_compiles_like_eager(lambda x, p, b: packed_linear(x, p, b, 40), (x, p, b))


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(3, 16), torch.randn(40, 16)
    p = pack_linear_weight(w)
    with pytest.raises(RuntimeError, match="packed_weight must be"):
        packed_linear(torch.randn(3, 15), p, None, 40)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        packed_linear(x.bfloat16(), p.bfloat16(), None, 40)
    with pytest.raises(RuntimeError, match="packed_weight must have the dtype of x"):
        packed_linear(x, p.double(), None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        packed_linear(x, p, None, 65)
    with pytest.raises(RuntimeError, match="out_features"):
        packed_linear(x, p, None, 32)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[out_features\] = \[40\]"):
        packed_linear(x, p, torch.randn(41), 40)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        packed_linear(x, p, torch.randn(40).double(), 40)
    with pytest.raises(ValueError, match="weight must be"):
        pack_linear_weight(torch.randn(3, 4, 5))


# ---- packed_swiglu: silu(x Wg^T) * (x Wu^T) on gate and up panels side by side ----

def swiglu_reference(x, wg, wu):
    x, wg, wu = x.double(), wg.double(), wu.double()
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [(0,), (1,), (2,), (3,), (5,), (6,), (7,), (19,), (2, 9)])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 31), (33, 64), (256, 100)])
def test_swiglu_matches_reference(dtype, rows, K, N):
    wg, wu = torch.randn(N, K, dtype=dtype) * K ** -0.5, torch.randn(N, K, dtype=dtype)
    x = torch.randn(*rows, K, dtype=dtype) * 3
    y = packed_swiglu(x, pack_swiglu_weight(wg, wu), N)
    ref = swiglu_reference(x, wg, wu)
    assert y.shape == (*rows, N) and y.dtype == dtype
    assert_close(y, ref, dtype, f"rows={rows} K={K} N={N}", scale=0.1)  # relative to outputs of ~700


def test_swiglu_gradcheck_opcheck_compile():
    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    p = pack_swiglu_weight(torch.randn(37, 13, dtype=torch.float64), torch.randn(37, 13, dtype=torch.float64))
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, p: packed_swiglu(x, p, 37), (x, p))
    torch.library.opcheck(torch.ops.leanformer.packed_swiglu.default, (torch.randn(5, 20), pack_swiglu_weight(
        torch.randn(40, 20), torch.randn(40, 20)), 40))
    x32 = torch.randn(4, 20, requires_grad=True)
    p32 = pack_swiglu_weight(torch.randn(40, 20), torch.randn(40, 20)).requires_grad_(True)
    assert_compiles_like_eager(lambda x, p: packed_swiglu(x, p, 40), (x32, p32))


def test_swiglu_bad_inputs_name_the_argument():
    x, p = torch.randn(3, 16), pack_swiglu_weight(torch.randn(40, 16), torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="packed_gate_up must be"):
        packed_swiglu(torch.randn(3, 15), p, 40)
    with pytest.raises(RuntimeError, match="packed_gate_up must be"):
        packed_swiglu(x, p[:, 0], 40)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        packed_swiglu(x.half(), p.half(), 40)
    with pytest.raises(RuntimeError, match="packed_gate_up must have the dtype of x"):
        packed_swiglu(x, p.double(), 40)
    with pytest.raises(RuntimeError, match="hidden = 70"):
        packed_swiglu(x, p, 70)
    with pytest.raises(ValueError, match="gate_weight and up_weight"):
        pack_swiglu_weight(torch.randn(40, 16), torch.randn(41, 16))
