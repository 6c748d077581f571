"""Honest storage accounting: the bits a compressed Linear actually stores (every value in the
weight dtype's bits, every N:M metadata word, the bias), and the largest rank within a budget."""
from __future__ import annotations

from typing import Callable

from leanformer.sparse.nm_format import meta_words, num_values


def dense_bits(out_features: int, in_features: int, bias: bool, value_bits: int) -> int:
    """An nn.Linear: weight and bias."""
    return (out_features * in_features + (out_features if bias else 0)) * value_bits


def nm_sparse_bits(out_features: int, in_features: int, n: int, m: int, bias: bool, value_bits: int) -> int:
    """An N:M sparse weight ``[out, in]``: kept values, int32 metadata words, bias."""
    values = num_values(in_features, n, m)
    return out_features * (values * value_bits + meta_words(values, m) * 32) + (out_features if bias else 0) * value_bits


def dense_sparse_bits(out_features: int, in_features: int, rank: int, n: int, m: int, bias: bool,
                      value_bits: int) -> int:
    """DSFormer's D ``[out, rank]`` dense + S ``[rank, in]`` N:M sparse + bias."""
    return out_features * rank * value_bits + nm_sparse_bits(rank, in_features, n, m, False, value_bits) + \
        (out_features if bias else 0) * value_bits


def low_rank_bits(out_features: int, in_features: int, rank: int, bias: bool, value_bits: int) -> int:
    """Truncated SVD as two dense factors ``[out, rank]`` and ``[rank, in]`` + bias."""
    return (out_features + in_features) * rank * value_bits + (out_features if bias else 0) * value_bits


def largest_rank(bits_of_rank: Callable[[int], int], budget_bits: float, max_rank: int) -> int:
    """The largest rank in ``[1, max_rank]`` whose storage fits ``budget_bits`` (0 if none does;
    storage grows with the rank, so a binary search)."""
    lo, hi = 0, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bits_of_rank(mid) <= budget_bits:
            lo = mid
        else:
            hi = mid - 1
    return lo
