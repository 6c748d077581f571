"""RepBN (SLAB, Guo et al. ICML 2024): BatchNorm over every token plus a learnable alpha * x,
and PRepBN's progressive norm, gamma * LayerNorm + (1 - gamma) * RepBN.

The kernels are torch.ops.leanformer.rep_batchnorm / progressive_norm and their backward ops,
in C++ on CPU and CUDA. One difference: in training, a mask that leaves at most one token
raises on CPU, while the CUDA kernels return NaN statistics (so NaN outputs) instead, as
the count is on the device and checking it on the host would sync every step; too few
tokens in all (x.shape) raise on both.
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
        _update_running_stats(x, mask, mean, invstd, running_mean, running_var, momentum, eps)
    return y


def progressive_norm(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                     alpha: Tensor, running_mean: Tensor, running_var: Tensor, gamma: float, *,
                     training: bool, momentum: float = 0.1, ln_eps: float = 1e-5, bn_eps: float = 1e-5,
                     mask: Optional[Tensor] = None) -> Tensor:
    """``gamma * LayerNorm(x) + (1 - gamma) * RepBN(x)`` in one pass over ``x [..., C]``.

    ``gamma`` in [0, 1] (PRepBN's schedule value, not learned); ``gamma = 1`` is LayerNorm and
    ``gamma = 0`` RepBN. The RepBN part behaves as :func:`rep_batchnorm` (statistics of the
    tokens where ``mask`` is true, running buffers updated in place when training).

    Example::

        >>> C = 8
        >>> x = torch.randn(4, 10, C)
        >>> y = progressive_norm(x, torch.ones(C), torch.zeros(C), torch.ones(C), torch.zeros(C),
        ...                      torch.ones(1), torch.zeros(C), torch.ones(C), 0.5, training=True)
    """
    y, mean, invstd = _ops.progressive_norm(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha,
                                            running_mean, running_var, float(gamma), training,
                                            ln_eps, bn_eps, mask)
    if training:
        _update_running_stats(x, mask, mean, invstd, running_mean, running_var, momentum, bn_eps)
    return y


def _update_running_stats(x, mask, mean, invstd, running_mean, running_var, momentum, eps):
    """As nn.BatchNorm does: the running variance is the unbiased one."""
    with torch.no_grad():
        count = x.numel() // max(x.shape[-1], 1) if mask is None else mask.sum()
        var = invstd.double().pow(-2) - eps
        running_mean.lerp_(mean, momentum)
        running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)


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


@torch.library.register_fake("leanformer::progressive_norm")
def _progressive_norm_fake(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean, running_var,
                           gamma, training, ln_eps, bn_eps, mask):
    C = x.shape[-1]
    return x.new_empty(x.shape), bn_weight.new_empty(C), bn_weight.new_empty(C)


@torch.library.register_fake("leanformer::progressive_norm_backward")
def _progressive_norm_backward_fake(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd, gamma,
                                    training, ln_eps, mask):
    C = x.shape[-1]
    return (x.new_empty(x.shape), *(bn_weight.new_empty(C) for _ in range(4)), alpha.new_empty(alpha.shape))


def _pn_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, rm, rv, gamma, training, ln_eps, bn_eps, mask = inputs
    _, mean, invstd = output
    ctx.gamma, ctx.training, ctx.ln_eps = gamma, training, ln_eps
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(x, ln_weight, bn_weight, alpha, mean, invstd, mask)


def _pn_backward(ctx, grad_y, _grad_mean, _grad_invstd):
    x, ln_weight, bn_weight, alpha, mean, invstd, mask = ctx.saved_tensors
    grads = _ops.progressive_norm_backward(grad_y, x, ln_weight, bn_weight, alpha, mean, invstd,
                                           ctx.gamma, ctx.training, ctx.ln_eps, mask)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("leanformer::progressive_norm", _pn_backward, setup_context=_pn_setup)


@torch.library.register_fake("leanformer::rep_batchnorm_stats")
def _rep_batchnorm_stats_fake(x, mask):
    return x.new_empty(2 * x.shape[-1] + 1, dtype=torch.float64)


@torch.library.register_fake("leanformer::progressive_norm_backward_reduce")
def _progressive_norm_backward_reduce_fake(grad_y, x, bn_mean, bn_invstd, gamma, ln_eps):
    return x.new_empty((4, x.shape[-1]), dtype=torch.float64)


@torch.library.register_fake("leanformer::progressive_norm_backward_elemt")
def _progressive_norm_backward_elemt_fake(grad_y, x, ln_weight, bn_weight, alpha, bn_mean, bn_invstd,
                                          mean_dy, mean_dy_xhat, gamma, ln_eps, mask):
    return x.new_empty(x.shape)
