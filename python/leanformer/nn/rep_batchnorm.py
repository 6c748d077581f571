"""RepBN: the BatchNorm of SLAB that replaces LayerNorm and folds away at inference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from leanformer.ops.rep_batchnorm import rep_batchnorm


class RepBN(nn.Module):
    """``RepBN(x) = BatchNorm(x) + alpha * x`` over the channels of ``x [..., C]``, statistics
    over every token (SLAB, Guo et al. ICML 2024).

    Args:
        num_features: C.
        alpha_init: initial alpha (1 in SLAB's vision models; the LLM variant uses 0).
        weight_init: initial BN weight (1; the LLM variant uses 0).
        momentum, eps: as in ``nn.BatchNorm1d``.

    ``forward(x, mask=None)``: ``mask`` (bool, ``x.shape[:-1]``) marks the tokens that enter
    the statistics (padding excluded). In eval it normalizes with the running statistics, and
    refuses to run before any training step has produced them.
    """

    def __init__(self, num_features: int, *, alpha_init: float = 1.0, weight_init: float = 1.0,
                 momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = nn.Parameter(torch.full((num_features,), float(weight_init)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"x must be [..., {self.num_features}] (channels last), got {tuple(x.shape)}")
        if not self.training and self.num_batches_tracked.item() == 0:
            raise RuntimeError("RepBN in eval has no running statistics: it was never run in training "
                               "mode (train it, or load a state_dict that has them)")
        if self.training:
            self.num_batches_tracked.add_(1)
        return rep_batchnorm(x, self.weight, self.bias, self.alpha, self.running_mean, self.running_var,
                             training=self.training, momentum=self.momentum, eps=self.eps, mask=mask)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"
