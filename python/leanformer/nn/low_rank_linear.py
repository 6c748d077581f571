"""A Linear layer factorized by truncated SVD (the low-rank baseline of DSFormer)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b``: ``down`` = ``nn.Linear(in, rank, bias=False)`` (V), ``up`` =
    ``nn.Linear(rank, out)`` (U and the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if not 1 <= rank:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> Tuple["LowRankLinear", float]:
        """The best rank-``rank`` approximation (truncated SVD, sqrt of the singular values on
        each side); returns ``(layer, ||W - U V||_F / ||W||_F)``."""
        w = linear.weight.detach()
        if not 1 <= rank <= min(w.shape):
            raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {list(w.shape)} weight, got {rank}")
        u, s, vh = torch.linalg.svd(w.double() if w.dtype == torch.float64 else w.float(), full_matrices=False)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None, device=w.device,
                    dtype=w.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
        err = ((w.to(up.dtype) - up @ down).norm() / w.to(up.dtype).norm()).item()
        return layer, err

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
