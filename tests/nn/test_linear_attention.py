"""leanformer.nn.SimplifiedLinearAttention: the SLAB block, its cache, and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from leanformer.nn import SimplifiedLinearAttention, SLACache
from leanformer.reference import sla_causal_quadratic_reference, sla_noncausal_reference
from tests.helpers import TORCH_DEVICES as DEVICES


def reference_block(m: SimplifiedLinearAttention, x, hw=None):
    """The block written out in plain PyTorch, as SLAB's slab_deit.py computes it."""
    B, T, C = x.shape
    H, hd = m.num_heads, m.head_dim
    q, k, v = m.qkv(x).view(B, T, 3, H, hd).unbind(2)
    if m.causal:
        o, _ = sla_causal_quadratic_reference(q, k, v, m.eps)
    else:
        o = sla_noncausal_reference(q, k, v, m.eps)
    if m.dwc is not None:
        if m.causal:
            seq = v.permute(0, 2, 3, 1).reshape(B * H, hd, T)
            conv = F.conv1d(F.pad(seq, (m.kernel_size - 1, 0)), m.dwc.weight, m.dwc.bias, groups=hd)
        else:
            gh, gw = hw or (math.isqrt(T),) * 2
            img = v.permute(0, 2, 3, 1).reshape(B * H, hd, gh, gw)
            conv = F.conv2d(img, m.dwc.weight, m.dwc.bias, padding=m.kernel_size // 2, groups=hd)
        o = o + conv.reshape(B, H, hd, T).permute(0, 3, 1, 2)
    return m.proj(o.reshape(B, T, C))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,T,hw", [(False, 49, None), (False, 24, (4, 6)), (True, 77, None)])
def test_block_matches_reference(device, causal, T, hw):
    m = SimplifiedLinearAttention(48, 4, causal=causal).to(device)
    x = torch.randn(3, T, 48, device=device, requires_grad=True)
    y = m(x, hw=hw)
    y_ref = reference_block(m, x, hw)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel_size", [0, 1, 4])
def test_prefill_then_steps_equals_full_causal(device, kernel_size):
    m = SimplifiedLinearAttention(32, 2, causal=True, dwc_kernel_size=kernel_size).to(device).eval()
    x = torch.randn(2, 90, 32, device=device)
    full = m(x)
    cache = SLACache()
    parts = [m(x[:, :2], cache=cache), m(x[:, 2:70], cache=cache)]
    parts += [m(x[:, t:t + 1], cache=cache) for t in range(70, 90)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x[:, :1]), full[:, :1], atol=1e-5, rtol=1e-5)  # one token, no cache
    assert cache.length == 90
    assert cache.state[0].shape == (2, 2, 16, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_module(device, causal):
    m = SimplifiedLinearAttention(32, 4, causal=causal).to(device)
    x = torch.randn(2, 36, 32, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="dim \\(30\\) must be divisible by num_heads \\(4\\)"):
        SimplifiedLinearAttention(30, 4)
    with pytest.raises(ValueError, match="dwc_kernel_size"):
        SimplifiedLinearAttention(32, 4, dwc_kernel_size=4)
    m = SimplifiedLinearAttention(32, 4)
    with pytest.raises(ValueError, match="hw must be given for a non-square number of tokens \\(10\\)"):
        m(torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match="hw=\\(3, 3\\) does not cover the 10 tokens"):
        m(torch.randn(1, 10, 32), hw=(3, 3))
    with pytest.raises(ValueError, match="x must be \\[B, T, 32\\]"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="cache is only supported for causal=True"):
        m(torch.randn(1, 9, 32), cache=SLACache())
