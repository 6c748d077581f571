"""The packed N:M layout shared by the CPU and CUDA kernels (csrc/ops.cpp documents the same).

Pattern N:M along K (the last dim of a dense ``[rows, K]`` matrix): every group of m
consecutive columns keeps at most n non-zeros.

* ``values [rows, K // m * n]``: group g's kept entries at ``values[:, g*n:(g+1)*n]``, in
  ascending column order. A group with fewer than n non-zeros is padded with explicit zeros
  at its smallest unused columns, so in-group indices are strictly ascending (CUTLASS's 2:4
  requirement too).
* ``meta int32 [rows, W]``: the in-group column of every value, ``meta_bits(m)`` bits each
  (ceil(log2 m) rounded up to a power of two, so no index straddles a 32-bit word). Value j
  of a row sits at bit ``(j*bits) % 32`` of word ``(j*bits) // 32``, LSB first;
  ``W = ceil(K // m * n * bits / 32)``; unused high bits are zero.
* The column of value j is ``(j // n) * m + idx_j``.
"""
from __future__ import annotations

import torch
from torch import Tensor

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}
SUPPORTED_M = tuple(_BITS)


def check_pattern(n: int, m: int) -> None:
    """Raise ValueError unless ``1 <= n < m`` and m is one of 2, 4, 8, 16."""
    if m not in _BITS:
        raise ValueError(f"N:M pattern: m must be one of {SUPPORTED_M}, got m={m}")
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern: n must satisfy 1 <= n < m={m}, got n={n}")


def check_columns(K: int, m: int) -> None:
    """Raise ValueError unless K (the reduction dim) is a whole number of groups of m."""
    if K % m != 0:
        raise ValueError(f"N:M pattern: K={K} (the last dim) must be a multiple of m={m}")


def meta_bits(m: int) -> int:
    """Bits per in-group index: 1, 2, 4, 4 for m = 2, 4, 8, 16."""
    check_pattern(1, m)
    return _BITS[m]


def num_values(K: int, n: int, m: int) -> int:
    """Kept values per row: K // m * n."""
    check_columns(K, m)
    return K // m * n


def meta_words(num_vals: int, m: int) -> int:
    """int32 words of metadata per row holding num_vals indices."""
    return (num_vals * meta_bits(m) + 31) // 32


def pack_meta(indices: Tensor, m: int) -> Tensor:
    """In-group indices ``[..., V]`` (integers in ``[0, m)``) -> int32 meta ``[..., W]``."""
    bits = meta_bits(m)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m):
        raise ValueError(f"pack_meta: indices must lie in [0, m={m})")
    per_word = 32 // bits
    V = indices.shape[-1]
    W = meta_words(V, m)
    padded = indices.new_zeros(*indices.shape[:-1], W * per_word, dtype=torch.int64)
    padded[..., :V] = indices
    shifts = torch.arange(per_word, device=indices.device, dtype=torch.int64) * bits
    words = (padded.view(*indices.shape[:-1], W, per_word) << shifts).sum(-1)
    # The fields are disjoint, so the sum is their OR; reinterpret bit 31 as the int32 sign.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_meta(meta: Tensor, n: int, m: int, K: int) -> Tensor:
    """int32 meta ``[..., W]`` -> int64 in-group indices ``[..., K // m * n]``."""
    check_pattern(n, m)
    V = num_values(K, n, m)
    bits = meta_bits(m)
    W = meta_words(V, m)
    if meta.dtype != torch.int32 or meta.shape[-1] != W:
        raise ValueError(f"unpack_meta: meta must be int32 [..., {W}] for K={K}, {n}:{m}; "
                         f"got {meta.dtype} {list(meta.shape)}")
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=meta.device, dtype=torch.int64) * bits
    words = meta.to(torch.int64) & 0xFFFFFFFF
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2)[..., :V]


def columns(indices: Tensor, n: int, m: int) -> Tensor:
    """In-group indices ``[..., V]`` -> absolute columns in ``[0, K)``: ``(j // n) * m + idx``."""
    group = torch.arange(indices.shape[-1], device=indices.device) // n
    return group * m + indices


def unpack_dense(values: Tensor, meta: Tensor, n: int, m: int, K: int) -> Tensor:
    """``values [..., K//m*n]`` + ``meta`` -> the dense ``[..., K]`` matrix (differentiable in values)."""
    V = num_values(K, n, m)
    if values.shape[-1] != V:
        raise ValueError(f"unpack_dense: values must be [..., {V}] for K={K}, {n}:{m}; "
                         f"got {list(values.shape)}")
    cols = columns(unpack_meta(meta, n, m, K), n, m).expand(*values.shape)
    return values.new_zeros(*values.shape[:-1], K).scatter(-1, cols, values)
