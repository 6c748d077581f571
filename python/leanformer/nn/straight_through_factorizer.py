"""DSFormer's Straight-Through Factorizer: D and an N:M-sparse S learned jointly, the pattern
chosen anew in every forward."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.nn.dense_sparse_linear import DenseSparseLinear
from leanformer.sparse import NMSparseMatrix, nm_mask
from leanformer.sparse.nm_format import check_columns, check_pattern


class StraightThroughFactorizer(nn.Module):
    """The training form of :class:`DenseSparseLinear`: ``y = (x P(L)^T) D^T + b`` where L
    ``[rank, in]`` is a dense latent and P keeps the n largest |L| of every m inputs (the N:M
    pattern is picked by magnitude in every forward, so it can change as L trains). The gradient
    w.r.t. P(L) passes straight through to all of L, so a pruned entry that the loss wants
    larger can grow back into the pattern. D (``dense.weight``) and L train jointly against
    any loss: the task's, or distillation from the original model.

    The forward runs dense matmuls (L changes every step, packing it would cost more than it
    saves); :meth:`finalize` packs the final pattern into a :class:`DenseSparseLinear` with the
    same output.

    Example::

        >>> stf, err = StraightThroughFactorizer.from_linear(nn.Linear(256, 128), rank=48)
        >>> loss = stf(torch.randn(5, 256)).square().mean(); loss.backward()
        >>> layer = stf.finalize()        # a DenseSparseLinear
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, n: int = 2, m: int = 4,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        check_pattern(n, m)
        check_columns(in_features, m)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank, self.n, self.m = in_features, out_features, rank, n, m
        self.latent = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.latent, a=5 ** 0.5)
        self.dense = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_dense_sparse(cls, layer: DenseSparseLinear) -> "StraightThroughFactorizer":
        """Start from a factorized layer: L = its S (dense), D and the bias copied."""
        stf = cls(layer.in_features, layer.out_features, layer.rank, n=layer.n, m=layer.m,
                  bias=layer.bias is not None, device=layer.dense.weight.device, dtype=layer.dense.weight.dtype)
        with torch.no_grad():
            stf.latent.copy_(layer.sparse.dense_weight())
            stf.dense.load_state_dict(layer.dense.state_dict())
        return stf

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, n: int = 2, m: int = 4, method: str = "alternating",
                    iters: int = 10) -> Tuple["StraightThroughFactorizer", float]:
        """Start from :meth:`DenseSparseLinear.from_linear`'s factorization; returns
        ``(module, relative reconstruction error)``."""
        layer, err = DenseSparseLinear.from_linear(linear, rank, n=n, m=m, method=method, iters=iters)
        return cls.from_dense_sparse(layer), err

    def mask(self) -> Tensor:
        """The N:M pattern the next forward uses (bool ``[rank, in]``)."""
        return nm_mask(self.latent.detach(), self.n, self.m)

    def sparse_weight(self) -> Tensor:
        """P(L) in the forward, identity in the backward (the straight-through estimator)."""
        pruned = self.latent.detach() * ~self.mask()
        return self.latent - pruned

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(F.linear(x, self.sparse_weight()))

    @torch.no_grad()
    def finalize(self) -> DenseSparseLinear:
        """The current pattern and values packed into a :class:`DenseSparseLinear` (same forward)."""
        s = NMSparseMatrix.prune(self.latent.detach(), self.n, self.m)
        bias = None if self.dense.bias is None else self.dense.bias.detach()
        return DenseSparseLinear.from_factors(self.dense.weight.detach().clone(), s,
                                              None if bias is None else bias.clone())

    to_dense_sparse = finalize

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"pattern={self.n}:{self.m}")
