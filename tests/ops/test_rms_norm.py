"""rms_norm (CPU) against its reference: every dtype, odd and empty shapes, non-contiguous x and
weight; the fixed summation order reproduced bit for bit; rows independent of each other and
of the thread count bit for bit; gradcheck, opcheck, torch.compile; LlamaLM's RMSNorm on the
op without gradients, close to the old path. (The ISAs against each other:
tests/ops/test_cpu_isa.py; bad inputs: tests/ops/test_bad_inputs.py.)"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanformer import _C
from leanformer.ops import rms_norm
from leanformer.reference import rms_norm_reference
from tests.helpers import assert_close, assert_compiles_like_eager, opcheck_each, two_threads  # noqa: F401

ops = torch.ops.leanformer
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# C: one element, one AVX-512 vector less one, exactly, plus one, SmolLM2's d_model, a tail of 8
WIDTHS = [1, 15, 16, 17, 576, 1000]
# rows: none, one (a decoding step), a few, a 64-node tree, leading dims
ROWS = [(0,), (1,), (3,), (64,), (2, 3)]


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_reference(dtype, C, rows):
    x = randn(*rows, C, dtype=dtype, scale=3.0)
    for w in (randn(C, dtype=dtype, seed=1), randn(C, seed=2)):  # in x's dtype, float32
        for eps in (1e-6, 0.5):
            y = rms_norm(x, w, eps)
            assert y.shape == x.shape and y.dtype == dtype
            assert_close(y, rms_norm_reference(x, w, eps), dtype, f"{dtype} rows={rows} C={C} {w.dtype} eps={eps}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_shapes(dtype):
    for shape in ((0,), (3, 0), (0, 5), (2, 0, 7), (4, 2, 0)):
        x = torch.randn(shape).to(dtype)
        y = rms_norm(x, torch.ones(shape[-1], dtype=dtype))
        assert y.shape == x.shape and y.dtype == dtype


def test_non_contiguous_inputs():
    base = randn(6, 40, 1000, scale=2.0)
    w = randn(2000, seed=1)[::2]  # a strided weight
    for x in (base.transpose(0, 1), base[:, ::3], base[..., 1:577], base.transpose(1, 2)[:, :17].transpose(1, 2)):
        assert not x.is_contiguous()
        wc = w[:x.shape[-1]]
        y = rms_norm(x, wc, 1e-5)
        assert y.is_contiguous()
        assert torch.equal(y, rms_norm(x.contiguous(), wc.contiguous(), 1e-5))
        assert_close(y, rms_norm_reference(x, wc, 1e-5), torch.float32)


def fixed_order(x, w, eps):
    """The kernel's fp32 arithmetic, in numpy float32 (IEEE operations, no fused or reordered
    ones): fma(x, x, acc) per lane (x * x is exact in fp64 and the sum rounded to fp32, a double
    rounding that a fixed seed does not hit), the lane tree, r = 1 / sqrt(s / C + eps), (x * r) * w."""
    C = x.shape[-1]
    xs = F.pad(x, (0, -C % 16)).reshape(*x.shape[:-1], -1, 16).double().numpy()
    acc = np.zeros((*x.shape[:-1], 16), dtype=np.float32)
    for k in range(xs.shape[-2]):
        acc = (acc.astype(np.float64) + xs[..., k, :] * xs[..., k, :]).astype(np.float32)
    v = acc
    for half in (8, 4, 2, 1):
        v = v[..., :half] + v[..., half:2 * half]
    r = np.float32(1) / np.sqrt(v / np.float32(C) + np.float32(eps))
    return torch.from_numpy((x.numpy() * r) * w.numpy())


@pytest.mark.parametrize("C", WIDTHS)
def test_fixed_summation_order_bit_for_bit(C):
    x, w = randn(37, C, scale=5.0), randn(C, seed=1)
    assert torch.equal(rms_norm(x, w, 1e-6), fixed_order(x, w, 1e-6))
    xb = x.bfloat16()
    assert torch.equal(rms_norm(xb, w, 1e-6), fixed_order(xb.float(), w, 1e-6).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_do_not_change_each_others_results(dtype):
    # a row's result is the same bits alone or in a 64-row tree (tree verification = decoding)
    x, w = randn(64, 577, dtype=dtype, scale=2.0), randn(577, dtype=dtype, seed=1)
    full = rms_norm(x, w)
    for i in (0, 7, 16, 63):
        assert torch.equal(rms_norm(x[i:i + 1], w), full[i:i + 1]), i
        assert torch.equal(rms_norm(x[i], w), full[i]), i
    assert torch.equal(rms_norm(x[5:24], w), full[5:24])


def test_threads_do_not_change_results(two_threads):
    # 2600 rows of 4100: ~4 ms of estimated work, over the grain of csrc/grain.h, so two chunks
    x, w = randn(2600, 4100), randn(4100, seed=1)
    before = _C.parallel_chunks()
    two = rms_norm(x, w)
    assert _C.parallel_chunks() - before == 2, "the call must open a parallel region of two chunks"
    torch.set_num_threads(1)
    assert torch.equal(rms_norm(x, w), two)


def test_gradcheck_fp64():
    x = randn(3, 5, 19, dtype=torch.float64, scale=2.0).requires_grad_()
    w = randn(19, dtype=torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-3), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: rms_norm(x, w, 1e-3), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_reference(dtype):
    x, w, g = randn(4, 7, 96, dtype=dtype, scale=2.0), randn(96, dtype=dtype, seed=1), randn(4, 7, 96, seed=2)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(rms_norm(xs, ws, 1e-5), (xs, ws), g.to(dtype))
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(rms_norm_reference(xr, wr, 1e-5), (xr, wr), g.to(dtype).float())
    assert gx.dtype == gw.dtype == dtype
    assert_close(gx, gx_ref.to(dtype), dtype, "grad_x", scale=4.0)  # sums over 96 before rounding
    assert_close(gw, gw_ref.to(dtype), dtype, "grad_w", scale=4.0)
    # float32 weight of a bfloat16 x: its gradient in float32
    wf = w.float().requires_grad_()
    (gwf,) = torch.autograd.grad(rms_norm(x, wf, 1e-5), (wf,), g.to(dtype))
    assert gwf.dtype == torch.float32


def test_opcheck():
    x, w = randn(3, 5, 33, scale=2.0), randn(33, seed=1)
    opcheck_each([("rms_norm", [x, w, 1e-6]), ("rms_norm", [x.bfloat16(), w, 1e-6]),
                  ("rms_norm", [x.double().requires_grad_(), w.double().requires_grad_(), 1e-6]),
                  ("rms_norm", [x.requires_grad_(), w.requires_grad_(), 0.0]),
                  ("rms_norm", [x[:, :0], w, 1e-6])])


def test_compiles_like_eager():
    x, w = randn(2, 9, 576, scale=2.0).requires_grad_(), randn(576, seed=1).requires_grad_()
    torch._dynamo.reset()
    assert_compiles_like_eager(lambda x, w: rms_norm(x, w, 1e-5), (x, w))


def test_llama_rmsnorm_uses_the_op_without_gradients():
    from leanformer.models.llama import RMSNorm
    norm = RMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(576, seed=1))
    x = randn(1, 1, 576, scale=3.0)
    with torch.no_grad():
        assert torch.equal(norm(x), ops.rms_norm(x, norm.weight, 1e-5))
    y = norm(x)  # the weight needs a gradient: F.rms_norm, with autograd
    assert y.requires_grad and torch.equal(y, F.rms_norm(x, (576,), norm.weight, 1e-5))
    assert_close(y.detach(), ops.rms_norm(x, norm.weight.detach(), 1e-5), torch.float32)


def test_llama_without_gradients_is_close_to_the_autograd_path():
    from leanformer.models import LlamaConfig, LlamaLM
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=64)).eval()
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        fast = model(tokens)
    slow = model(tokens)  # the weights need gradients: every RMSNorm on F.rms_norm
    assert slow.requires_grad
    assert_close(fast, slow.detach(), torch.float32, "logits", scale=5.0)  # fp32 rounding through 2 layers
