"""rms_norm written plainly in PyTorch: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim,
in fp32 (fp64 for fp64 inputs), rounded once to x's dtype. Shapes as in :mod:`leanformer.ops.rms_norm`;
the kernel fixes its own summation order, so the two agree to rounding, not bit for bit."""
from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """As ``leanformer.ops.rms_norm``: ``(x * r) * weight`` with ``r = 1 / sqrt(mean(x^2) + eps)``
    per row, computed in fp32 (fp64 for fp64 x), the result in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * weight.to(acc)).to(x.dtype)
