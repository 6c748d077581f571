"""RMSNorm over the last dim as one CPU op: ``torch.ops.leanformer.rms_norm``. Decoding a Llama
calls it twice per layer on one row of d_model values, where ``F.rms_norm``'s few aten calls cost
more than the arithmetic. Its fake kernel (torch.compile, export) is the C++ Meta kernel of
csrc/rms_norm_meta.cpp, running the CPU kernel's argument checks. Autograd w.r.t. x and weight
(torch ops, fp32 math for the 16-bit dtypes). CPU only: on CUDA keep ``F.rms_norm``."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_ops = torch.ops.leanformer


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight``, one call (CPU).

    Args:
        x: ``[..., C]``, float32, float16, bfloat16 or float64, any strides.
        weight: ``[C]``, in x's dtype or float32, on x's device.
        eps: ``>= 0`` and finite.

    Returns:
        ``[..., C]`` in x's dtype. Per row, in fp32 (fp64 for float64; 16-bit inputs converted
        first): the sum of squares in 16 lane accumulators (lane j the fma chain of ``x[i]^2``
        for ``i = j (mod 16)``, in increasing i) reduced by a fixed tree, ``r = 1 / sqrt(s / C +
        eps)``, then ``y = (x * r) * weight``, rounded once to x's dtype. The order is fixed so
        that the AVX-512, AVX2 and portable paths give the same bits and a row's result does not
        depend on the other rows (a token tree's rows normalize as plain decoding's do). Against
        ``F.rms_norm`` the results differ only by fp32 rounding.

    Example::

        >>> x = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
        >>> rms_norm(x, torch.tensor([1.0, 2.0]), eps=0.0)  # rows' rms: sqrt(12.5) and 1
        tensor([[0.8485, 2.2627],
                [1.0000, 2.0000]])
    """
    return _ops.rms_norm(x, weight, eps)


def _setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, gf = x.to(acc), grad_y.to(acc)
    C = x.shape[-1]
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        gw = gf * weight.to(acc)
        grad_x = (r * gw - xf * r.pow(3) * (gw * xf).sum(-1, keepdim=True) / C).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (gf * xf * r).reshape(math.prod(x.shape[:-1]), C).sum(0).to(weight.dtype)
    return grad_x, grad_w, None


torch.library.register_autograd("leanformer::rms_norm", _backward, setup_context=_setup)
