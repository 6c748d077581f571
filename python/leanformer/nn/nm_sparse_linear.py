"""A Linear layer whose weight is N:M sparse and stored packed (values + metadata)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from leanformer.ops.nm_sparse_linear import nm_sparse_linear
from leanformer.sparse import NMSparseMatrix
from leanformer.sparse.nm_format import check_columns, check_pattern, meta_words, num_values


class NMSparseLinear(nn.Module):
    """``y = x W^T + b`` with W ``[out_features, in_features]`` N:M sparse along in_features,
    through :func:`leanformer.ops.nm_sparse_linear` (reads only the packed weight).

    ``values`` (``[out, in // m * n]``) is a Parameter and ``meta`` (int32) a buffer, so the
    state_dict saves and loads the packed form and training updates the kept values under the
    fixed pattern. :meth:`from_linear` prunes a trained ``nn.Linear`` by magnitude.

    Example::

        >>> layer = NMSparseLinear.from_linear(nn.Linear(128, 64), n=2, m=4)
        >>> layer(torch.randn(3, 128)).shape
        torch.Size([3, 64])
    """

    def __init__(self, in_features: int, out_features: int, *, n: int = 2, m: int = 4, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_pattern(n, m)
        check_columns(in_features, m)
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        factory = {"device": device, "dtype": dtype}
        values = num_values(in_features, n, m)
        self.values = nn.Parameter(torch.empty(out_features, values, **factory))
        self.register_buffer("meta", torch.zeros(out_features, meta_words(values, m), dtype=torch.int32,
                                                 device=device))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialization of a dense weight, pruned to the pattern by magnitude."""
        dense = torch.empty(self.out_features, self.in_features, device=self.values.device,
                            dtype=self.values.dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self.load_sparse(NMSparseMatrix.prune(dense, self.n, self.m))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_sparse(self, sparse: NMSparseMatrix) -> None:
        """Take ``sparse``'s values and pattern (its shape and n:m must be this layer's)."""
        if (tuple(sparse.shape), sparse.n, sparse.m) != ((self.out_features, self.in_features), self.n, self.m):
            raise ValueError(f"expected a {self.n}:{self.m} matrix of shape {(self.out_features, self.in_features)}, "
                             f"got {sparse.n}:{sparse.m} {tuple(sparse.shape)}")
        self.values.copy_(sparse.values)
        self.meta.copy_(sparse.meta)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, n: int = 2, m: int = 4) -> "NMSparseLinear":
        """Magnitude N:M pruning of ``linear`` (the n largest |w| of every group of m inputs)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, n=n, m=m, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        layer.load_sparse(NMSparseMatrix.prune(w, n, m))
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def sparse(self) -> NMSparseMatrix:
        """The weight as an :class:`NMSparseMatrix` (sharing this layer's tensors, detached)."""
        return NMSparseMatrix(self.values.detach(), self.meta, self.n, self.m, (self.out_features, self.in_features))

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``[out, in]`` tensor (zeros outside the pattern)."""
        return self.sparse().to_dense()

    def storage_bits(self) -> int:
        """Stored bits: values, every metadata word, and the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size() * 8
        return self.sparse().storage_bits() + bias

    def forward(self, x: Tensor) -> Tensor:
        return nm_sparse_linear(x, self.values, self.meta, self.bias, n=self.n, m=self.m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
                f"bias={self.bias is not None}")
