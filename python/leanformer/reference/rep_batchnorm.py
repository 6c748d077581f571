"""RepBN written the way a user would in eager PyTorch."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rep_batchnorm_reference(x: Tensor, weight: Tensor, bias: Tensor, alpha: Tensor,
                            running_mean: Tensor, running_var: Tensor, *, training: bool,
                            momentum: float = 0.1, eps: float = 1e-5,
                            mask: Optional[Tensor] = None) -> Tensor:
    """BN(x) + alpha * x over every token of x [..., C]; updates the running buffers in place
    when training. With a mask, only the tokens where it is true enter the statistics."""
    C = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), C)  # -1 would be ambiguous for C = 0
    if mask is None:
        # Contiguous weight and, in eval, running statistics: F.batch_norm's CPU backward reads
        # strided ones as if contiguous (torch 2.14: wrong grad_input and grad_weight, correct
        # forward). The running statistics it updates in training are passed as they are.
        rm, rv = (running_mean, running_var) if training else (running_mean.contiguous(), running_var.contiguous())
        y = F.batch_norm(rows, rm, rv, weight.contiguous(), bias.contiguous(), training, momentum, eps)
        return y.view_as(x) + alpha * x
    if not training:
        mean, var = running_mean, running_var
    else:
        sel = rows[mask.reshape(-1)]
        mean, var = sel.mean(0), sel.var(0, unbiased=False)
        with torch.no_grad():
            n = sel.shape[0]
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_((var.detach() * n / (n - 1)).to(running_var.dtype), momentum)
    y = (rows - mean) * torch.rsqrt(var + eps) * weight + bias
    return y.view_as(x) + alpha * x


def progressive_norm_reference(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, bn_weight: Tensor,
                               bn_bias: Tensor, alpha: Tensor, running_mean: Tensor, running_var: Tensor,
                               gamma: float, *, training: bool, momentum: float = 0.1,
                               ln_eps: float = 1e-5, bn_eps: float = 1e-5,
                               mask: Optional[Tensor] = None) -> Tensor:
    """gamma * LayerNorm(x) + (1 - gamma) * RepBN(x), as three eager modules would compute it."""
    ln = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    bn = rep_batchnorm_reference(x, bn_weight, bn_bias, alpha, running_mean, running_var,
                                 training=training, momentum=momentum, eps=bn_eps, mask=mask)
    return gamma * ln + (1 - gamma) * bn
