"""RepBN / PRepBN training with the batch statistics synchronized across the ranks of a
``torch.distributed`` process group, as ``nn.SyncBatchNorm`` does: the result on each rank is
its shard of what one process computes on the concatenated batch.

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
