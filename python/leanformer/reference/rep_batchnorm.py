"""RepBN written the way a user would in eager PyTorch."""
from __future__ import annotations

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
    rows = x.reshape(-1, C)
    if mask is None:
        y = F.batch_norm(rows, running_mean, running_var, weight, bias, training, momentum, eps)
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
