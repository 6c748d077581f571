"""RepBN (SLAB, Guo et al. ICML 2024): BatchNorm over every token plus a learnable alpha * x.

The kernels are torch.ops.leanformer.rep_batchnorm / rep_batchnorm_backward (C++ on CPU; no
CUDA kernel yet: CUDA tensors raise the dispatcher's "could not run ... CUDA" error).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.leanformer


def rep_batchnorm(x: Tensor, weight: Tensor, bias: Tensor, alpha: Tensor, running_mean: Tensor,
                  running_var: Tensor, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                  mask: Optional[Tensor] = None) -> Tensor:
    """``y = BN(x) + alpha * x`` per channel over every token of ``x [..., C]``.

    Training normalizes with the batch statistics (biased variance) of the tokens where
    ``mask`` (bool, ``x.shape[:-1]``) is true, all tokens when it is None, and updates
    ``running_mean``/``running_var`` in place (unbiased variance, ``momentum``), as
    ``nn.BatchNorm1d`` does; padding tokens are still normalized, they just do not count.
    Eval normalizes with the running statistics.

    Args:
        x: ``[..., C]``, float32/float16/bfloat16 (float64 for gradcheck).
        weight, bias, running_mean, running_var: ``[C]``, float32 (float64 for float64 x).
        alpha: one value, float32 (float64 for float64 x).

    Example::

        >>> C = 8
        >>> x = torch.randn(4, 10, C)
        >>> w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
        >>> y = rep_batchnorm(x, w, b, torch.ones(1), rm, rv, training=True)
    """
    y, mean, invstd = _ops.rep_batchnorm(x, weight, bias, alpha, running_mean, running_var,
                                         training, eps, mask)
    if training:
        with torch.no_grad():
            count = x.numel() // max(x.shape[-1], 1) if mask is None else mask.sum()
            var = invstd.double().pow(-2) - eps
            unbiased = var * count / (count - 1)
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return y


@torch.library.register_fake("leanformer::rep_batchnorm")
def _rep_batchnorm_fake(x, weight, bias, alpha, running_mean, running_var, training, eps, mask):
    C = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty(C), weight.new_empty(C)


@torch.library.register_fake("leanformer::rep_batchnorm_backward")
def _rep_batchnorm_backward_fake(grad_y, x, weight, alpha, mean, invstd, training, mask):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape), alpha.new_empty(alpha.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, alpha, running_mean, running_var, training, eps, mask = inputs
    y, mean, invstd = output
    ctx.training = training
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(x, weight, alpha, mean, invstd, mask)


def _backward(ctx, grad_y, _grad_mean, _grad_invstd):
    x, weight, alpha, mean, invstd, mask = ctx.saved_tensors
    dx, dw, db, dalpha = _ops.rep_batchnorm_backward(grad_y, x, weight, alpha, mean, invstd,
                                                     ctx.training, mask)
    return dx, dw, db, dalpha, None, None, None, None, None


torch.library.register_autograd("leanformer::rep_batchnorm", _backward, setup_context=_setup)
