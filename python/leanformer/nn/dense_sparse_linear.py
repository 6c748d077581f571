"""DSFormer's dense-sparse factorized Linear (Chand et al. 2023): W ~ D S, D dense, S N:M sparse."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from leanformer.nn.dense_sparse_factorization import factorize
from leanformer.nn.nm_sparse_linear import NMSparseLinear
from leanformer.sparse import NMSparseMatrix


class DenseSparseLinear(nn.Module):
    """``y = (x S^T) D^T + b``: a drop-in for ``nn.Linear(in_features, out_features)`` with its
    weight factorized as D ``[out, rank]`` (dense) times S ``[rank, in]`` (N:M sparse along in).

    Submodules: ``sparse``, an :class:`NMSparseLinear` ``(in -> rank)`` without bias (S packed:
    ``sparse.values`` a Parameter, ``sparse.meta`` an int32 buffer, so fine-tuning updates the
    kept values under the fixed pattern through the op's gradient), then ``dense``, an
    ``nn.Linear(rank, out)`` holding D (``dense.weight``) and the bias. ``init_error`` holds the
    relative reconstruction error ``||W - D S||_F / ||W||_F`` of :meth:`from_linear` (None for
    a randomly initialized layer).

    Example::

        >>> layer, err = DenseSparseLinear.from_linear(nn.Linear(256, 128), rank=48, n=2, m=4)
        >>> layer(torch.randn(5, 256)).shape, err == layer.init_error
        (torch.Size([5, 128]), True)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, n: int = 2, m: int = 4,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank, self.n, self.m = in_features, out_features, rank, n, m
        self.sparse = NMSparseLinear(in_features, rank, n=n, m=m, bias=False, device=device, dtype=dtype)
        self.dense = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.init_error = None

    @property
    def bias(self):
        return self.dense.bias

    @classmethod
    def from_factors(cls, d: Tensor, s: NMSparseMatrix, bias=None) -> "DenseSparseLinear":
        """The layer with D = ``d [out, rank]``, S = ``s`` (``[rank, in]``) and ``bias``."""
        rank, in_features = s.shape
        if d.dim() != 2 or d.shape[1] != rank:
            raise ValueError(f"d must be [out, rank={rank}] to match s {tuple(s.shape)}, got {tuple(d.shape)}")
        layer = cls(in_features, d.shape[0], rank, n=s.n, m=s.m, bias=bias is not None, device=d.device,
                    dtype=d.dtype)
        layer.sparse.load_sparse(s)
        with torch.no_grad():
            layer.dense.weight.copy_(d)
            if bias is not None:
                layer.dense.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, n: int = 2, m: int = 4, method: str = "alternating",
                    iters: int = 10) -> Tuple["DenseSparseLinear", float]:
        """Factorize a trained ``linear`` (see :func:`leanformer.nn.dense_sparse_factorization.factorize`
        for ``method`` and ``iters``); returns ``(layer, relative reconstruction error)``, the
        error also kept as ``layer.init_error``."""
        d, s, err = factorize(linear.weight.detach(), rank, n, m, method=method, iters=iters)
        layer = cls.from_factors(d, NMSparseMatrix.from_dense(s, n, m),
                                 None if linear.bias is None else linear.bias.detach())
        layer.init_error = err
        return layer, err

    def dense_weight(self) -> Tensor:
        """D S as a dense ``[out, in]`` weight."""
        return self.dense.weight.detach() @ self.sparse.dense_weight()

    def storage_bits(self) -> int:
        """Stored bits: D, S's values and every metadata word, and the bias."""
        return self.sparse.storage_bits() + sum(p.numel() * p.element_size() * 8 for p in self.dense.parameters())

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(self.sparse(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"pattern={self.n}:{self.m}")
