"""NMSparseMatrix: a dense ``[rows, K]`` matrix stored in the packed N:M form of nm_format."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from leanformer.sparse.nm_format import (
    check_columns,
    check_pattern,
    meta_words,
    num_values,
    pack_meta,
    unpack_dense,
)


def _groups(dense: Tensor, n: int, m: int) -> Tensor:
    check_pattern(n, m)
    if dense.dim() != 2:
        raise ValueError(f"N:M: expected a 2-D [rows, K] matrix, got shape {list(dense.shape)}")
    check_columns(dense.shape[1], m)
    return dense.reshape(dense.shape[0], dense.shape[1] // m, m)


def nm_mask(dense: Tensor, n: int, m: int) -> Tensor:
    """Bool mask ``[rows, K]`` keeping the n largest ``|w|`` of every group of m columns.

    Ties go to the lowest column (a stable descending sort), so the mask has exactly n True
    entries per group and is reproducible. NaN ranks as the largest magnitude."""
    groups = _groups(dense, n, m)
    order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, order, True)
    return mask.reshape(dense.shape)


def _pack(dense: Tensor, keep: Tensor, n: int, m: int) -> Tuple[Tensor, Tensor]:
    """Pack the entries of ``keep`` (at most n True per group): the kept columns, then the
    smallest unused ones as zero padding, ascending within each group."""
    groups = _groups(dense, n, m)
    keep = keep.reshape(groups.shape)
    col = torch.arange(m, device=dense.device)
    rank_key = (~keep).to(torch.int64) * m + col  # kept first, then by column
    idx = rank_key.argsort(dim=-1)[..., :n].sort(dim=-1).values
    values = (groups * keep).gather(-1, idx)
    rows, V = groups.shape[0], groups.shape[1] * n  # explicit: -1 is ambiguous for 0 rows
    return values.reshape(rows, V).contiguous(), pack_meta(idx.reshape(rows, V), m)


class NMSparseMatrix:
    """A ``[rows, K]`` matrix that is N:M sparse along K, stored as ``values`` + ``meta``.

    Attributes:
        values: ``[rows, K // m * n]`` in the matrix dtype (see nm_format for the layout).
        meta: int32 ``[rows, W]``, the bit-packed in-group column of every value.
        n, m: the pattern (``1 <= n < m``, m in 2, 4, 8, 16).
        shape: ``(rows, K)`` of the dense matrix.

    Example::

        >>> w = torch.randn(64, 128)
        >>> s = NMSparseMatrix.prune(w, 2, 4)
        >>> torch.equal(s.to_dense(), w * nm_mask(w, 2, 4))
        True
        >>> y = s.linear(torch.randn(3, 128))   # [3, 64], reads only values + meta
    """

    def __init__(self, values: Tensor, meta: Tensor, n: int, m: int, shape: Tuple[int, int]):
        check_pattern(n, m)
        rows, K = (int(d) for d in shape)
        V = num_values(K, n, m)
        W = meta_words(V, m)
        if values.shape != (rows, V):
            raise ValueError(f"NMSparseMatrix: values must be [{rows}, {V}] for shape {(rows, K)} "
                             f"and {n}:{m}, got {list(values.shape)}")
        if meta.dtype != torch.int32 or meta.shape != (rows, W):
            raise ValueError(f"NMSparseMatrix: meta must be int32 [{rows}, {W}], "
                             f"got {meta.dtype} {list(meta.shape)}")
        if meta.device != values.device:
            raise ValueError(f"NMSparseMatrix: meta is on {meta.device}, values on {values.device}")
        self.values, self.meta, self.n, self.m, self.shape = values, meta, n, m, (rows, K)

    @classmethod
    def from_dense(cls, dense: Tensor, n: int, m: int) -> "NMSparseMatrix":
        """Pack a matrix that already is N:M; raises ValueError naming the first row and group
        with more than n non-zeros."""
        groups = _groups(dense, n, m)
        nonzero = groups != 0
        over = nonzero.sum(-1) > n
        if bool(over.any()):
            row, group = (int(i) for i in over.nonzero()[0])
            raise ValueError(
                f"NMSparseMatrix.from_dense: row {row}, group {group} (columns {group * m}.."
                f"{group * m + m - 1}) has {int(nonzero[row, group].sum())} non-zeros, more than "
                f"n={n} of every m={m}; use NMSparseMatrix.prune to keep the n largest")
        return cls(*_pack(dense, nonzero, n, m), n, m, dense.shape)

    @classmethod
    def prune(cls, dense: Tensor, n: int, m: int) -> "NMSparseMatrix":
        """Keep the n largest ``|w|`` of every group (ties to the lowest column), see nm_mask."""
        return cls(*_pack(dense, nm_mask(dense, n, m), n, m), n, m, dense.shape)

    def to_dense(self) -> Tensor:
        """The dense ``[rows, K]`` matrix (zeros outside the pattern)."""
        return unpack_dense(self.values, self.meta, self.n, self.m, self.shape[1])

    def to(self, *args, **kwargs) -> "NMSparseMatrix":
        """Like ``Tensor.to`` for device and dtype: the dtype applies to ``values`` only
        (``meta`` stays int32)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        values = self.values.to(device=device, dtype=dtype, non_blocking=non_blocking)
        meta = self.meta.to(device=device, non_blocking=non_blocking)
        return NMSparseMatrix(values, meta, self.n, self.m, self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def state_dict(self) -> dict:
        """Tensors and ints only, so ``torch.save`` (and ``weights_only`` loading) round-trips it."""
        return {"values": self.values, "meta": self.meta, "n": self.n, "m": self.m,
                "shape": list(self.shape)}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "NMSparseMatrix":
        return cls(sd["values"], sd["meta"], int(sd["n"]), int(sd["m"]), tuple(sd["shape"]))

    def storage_bits(self) -> int:
        """Bits actually stored: the values plus every metadata word (padding bits included)."""
        return (self.values.numel() * self.values.element_size() + self.meta.numel() * 4) * 8

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``x @ S^T + bias``: the op ``torch.ops.leanformer.nm_sparse_linear`` on ``values`` and
        ``meta`` (see :func:`leanformer.ops.nm_sparse_linear`; differentiable in x, values and bias)."""
        return torch.ops.leanformer.nm_sparse_linear(x, self.values, self.meta, bias, n=self.n, m=self.m)

    def __repr__(self) -> str:
        dense_bits = self.shape[0] * self.shape[1] * self.values.element_size() * 8
        return (f"NMSparseMatrix(shape={self.shape}, pattern={self.n}:{self.m}, dtype={self.dtype}, "
                f"device={self.device}, storage={self.storage_bits() / dense_bits:.3f} of dense)")
