"""RepBN (SLAB, Guo et al. ICML 2024): BatchNorm over every token plus a learnable alpha * x,
and PRepBN's progressive norm, gamma * LayerNorm + (1 - gamma) * RepBN.

The kernels are torch.ops.leanformer.rep_batchnorm / progressive_norm and their backward ops,
in C++ on CPU and CUDA. One difference: in training, a mask that leaves at most one token
raises on CPU, while the CUDA kernels return NaN statistics (so NaN outputs) instead, as
the count is on the device and checking it on the host would sync every step; too few
tokens in all (x.shape) raise on both.

Synchronized statistics (``sync_rep_batchnorm`` / ``sync_progressive_norm``): RepBN / PRepBN
training with the batch statistics synchronized across the ranks of a ``torch.distributed``
process group, as ``nn.SyncBatchNorm`` does: the result on each rank is its shard of what one
process computes on the concatenated batch.

Forward: ``rep_batchnorm_stats`` gives the shard's fp64 (sum x, sum x^2, count) over its
counted (unmasked) tokens, one ``all_reduce`` makes them global, and the ``rep_batchnorm`` /
``progressive_norm`` kernel runs in eval mode with the global mean and biased variance as its
statistics: that is the training forward. The running buffers are updated from the global
statistics (unbiased with the global count), identically on every rank.

Backward: ``progressive_norm_backward_reduce`` gives the shard's column sums of dy and
dy * xhat over every token (the output of every token depends on the statistics), one
``all_reduce`` of those two makes them global, and ``progressive_norm_backward_elemt`` writes
grad_x with them divided by the global count. Parameter gradients stay local (DDP averages
them). Every rank of the group must call forward and backward, as with SyncBatchNorm.

The three ops have CPU and CUDA kernels, for x (and mask) on either device with a process
group whose backend serves it (gloo on CPU, NCCL on CUDA). The CUDA ones are deterministic
(no atomics) and do not sync with the host; the forward here reads the global count once.

Precision: the shard sums are unshifted fp64 (each accumulated about shifts taken from the
data, near the channel's values, then unshifted in fp64), so the variance E[x^2] - E[x]^2
loses about log10(mean^2 / var) of fp64's 16 digits: below fp32 resolution unless |mean| / std
exceeds ~1e4.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
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


# ---- synchronized statistics across torch.distributed ranks ----


def _check_group(process_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("synchronized batch statistics need an initialized torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    if torch.compiler.is_compiling():
        raise RuntimeError("leanformer's synchronized RepBN/PRepBN training forward does not run under "
                           "torch.compile (its collectives would graph-break); compile the eval model, "
                           "or pass sync_stats=False to train with per-rank statistics")
    return dist.group.WORLD if process_group is None else process_group


class _SyncNorm(torch.autograd.Function):
    """gamma * LayerNorm(x) + (1 - gamma) * RepBN(x) with global batch statistics; RepBN alone
    when ln_weight is None (gamma 0)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean, running_var,
                mask, gamma, momentum, ln_eps, bn_eps, group):
        C = x.shape[-1]
        stats = _ops.rep_batchnorm_stats(x, mask)
        dist.all_reduce(stats, group=group)
        count = float(stats[2 * C])
        if count <= 1:
            raise ValueError("batch norm: training needs more than one "
                             + ("unmasked " if mask is not None else "")
                             + f"token per channel over all ranks to estimate statistics, got {int(count)}")
        mean = stats[:C] / count
        var = (stats[C:2 * C] / count - mean * mean).clamp_min_(0)
        pd = running_mean.dtype
        if ln_weight is None:
            y, bn_mean, invstd = _ops.rep_batchnorm(x, bn_weight, bn_bias, alpha, mean.to(pd), var.to(pd),
                                                    False, bn_eps, None)
        else:
            y, bn_mean, invstd = _ops.progressive_norm(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha,
                                                       mean.to(pd), var.to(pd), gamma, False, ln_eps,
                                                       bn_eps, None)
        running_mean.lerp_(mean.to(pd), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(pd), momentum)
        ctx.save_for_backward(x, ln_weight, bn_weight, alpha, bn_mean, invstd, mask)
        ctx.gamma, ctx.ln_eps, ctx.count, ctx.group = gamma, ln_eps, count, group
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, ln_weight, bn_weight, alpha, bn_mean, invstd, mask = ctx.saved_tensors
        g = ctx.gamma
        sums = _ops.progressive_norm_backward_reduce(grad_y, x, bn_mean, invstd, g, ctx.ln_eps)
        means = sums[:2].clone()  # sum dy, sum dy * xhat: one collective
        dist.all_reduce(means, group=ctx.group)
        means /= ctx.count
        dx = _ops.progressive_norm_backward_elemt(grad_y, x, ln_weight, bn_weight, alpha, bn_mean, invstd,
                                                  means[0], means[1], g, ctx.ln_eps, mask)
        pd = bn_weight.dtype
        d_bn_w, d_bn_b = ((1 - g) * sums[1]).to(pd), ((1 - g) * sums[0]).to(pd)
        d_alpha = ((1 - g) * sums[2].sum()).to(pd).reshape(alpha.shape)
        d_ln_w = d_ln_b = None
        if ln_weight is not None:
            d_ln_w, d_ln_b = (g * sums[3]).to(pd), (g * sums[0]).to(pd)
        return dx, d_ln_w, d_ln_b, d_bn_w, d_bn_b, d_alpha, *(None,) * 8


def sync_rep_batchnorm(x: Tensor, weight: Tensor, bias: Tensor, alpha: Tensor, running_mean: Tensor,
                       running_var: Tensor, *, process_group=None, momentum: float = 0.1,
                       eps: float = 1e-5, mask: Optional[Tensor] = None) -> Tensor:
    """The training forward of :func:`~leanformer.ops.rep_batchnorm` with the statistics of the
    batch over every rank of ``process_group`` (None: the default group). Every rank must call
    it (and its backward). Updates the running buffers in place, the same way on every rank.
    """
    group = _check_group(process_group)
    return _SyncNorm.apply(x, None, None, weight, bias, alpha, running_mean, running_var, mask, 0.0,
                           momentum, 0.0, eps, group)


def sync_progressive_norm(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, bn_weight: Tensor,
                          bn_bias: Tensor, alpha: Tensor, running_mean: Tensor, running_var: Tensor,
                          gamma: float, *, process_group=None, momentum: float = 0.1,
                          ln_eps: float = 1e-5, bn_eps: float = 1e-5,
                          mask: Optional[Tensor] = None) -> Tensor:
    """The training forward of :func:`~leanformer.ops.progressive_norm` with the RepBN
    statistics of the batch over every rank of ``process_group`` (None: the default group);
    the LayerNorm part is row-local. Every rank must call it (and its backward)."""
    group = _check_group(process_group)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return _SyncNorm.apply(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, running_mean, running_var,
                           mask, float(gamma), momentum, ln_eps, bn_eps, group)
