"""``dsformer(model, compression=...)``: every chosen nn.Linear becomes a DenseSparseLinear of
the largest rank that meets the target compression."""
from __future__ import annotations

from torch import nn

from leanformer.compress.result import CompressionResult, LayerCompression
from leanformer.compress.selection import Modules, check_compression, replace_module, select_linears, value_bits
from leanformer.compress.storage import dense_bits, dense_sparse_bits, largest_rank
from leanformer.nn.dense_sparse_linear import DenseSparseLinear


def dsformer_rank(linear: nn.Linear, compression: float, n: int, m: int) -> int:
    """The largest rank whose D + S values + S metadata + bias storage is at most the dense
    layer's over ``compression`` (0 if even rank 1 is too big)."""
    out_f, in_f, bias, bits = linear.out_features, linear.in_features, linear.bias is not None, value_bits(linear)
    budget = dense_bits(out_f, in_f, bias, bits) / compression
    return largest_rank(lambda r: dense_sparse_bits(out_f, in_f, r, n, m, bias, bits), budget, min(out_f, in_f))


def dsformer(model: nn.Module, *, compression: float, n: int = 2, m: int = 4, modules: Modules = None,
             method: str = "alternating", iters: int = 10) -> CompressionResult:
    """Replace the chosen Linear layers of ``model`` (in place) by :class:`DenseSparseLinear`
    factorizations ``W ~ D S`` (S ``n:m`` sparse), each of the largest rank whose honest storage
    meets ``compression`` (dense bits / compressed bits) for that layer, initialized by
    ``method`` (see :func:`leanformer.nn.dense_sparse_factorization.factorize`).

    ``modules``: None for every Linear but embeddings and heads, names, or a predicate (see
    :func:`leanformer.compress.selection.select_linears`). Returns the achieved compression
    of the replaced layers and, per layer, its rank and relative reconstruction error.
    Raises ValueError if ``compression <= 1`` or a layer cannot meet it at rank 1.

    Example::

        >>> result = dsformer(model, compression=2.0)
        >>> result.compression, result.layers["blocks.0.mlp.fc1"].rank
    """
    check_compression(compression)
    chosen = select_linears(model, modules, multiple_of=m)
    ranks = {}
    for name, linear in chosen:  # all ranks first: a layer that cannot comply fails before any change
        ranks[name] = dsformer_rank(linear, compression, n, m)
        if ranks[name] == 0:
            raise ValueError(f"{name} ({linear.out_features}x{linear.in_features}) cannot reach compression "
                             f"{compression} with a {n}:{m} DenseSparseLinear even at rank 1")
    layers = {}
    for name, linear in chosen:
        layer, err = DenseSparseLinear.from_linear(linear, ranks[name], n=n, m=m, method=method, iters=iters)
        layers[name] = LayerCompression(dense_bits(linear.out_features, linear.in_features, linear.bias is not None,
                                                   value_bits(linear)),
                                        layer.storage_bits(), rank=ranks[name], error=err, pattern=f"{n}:{m}")
        replace_module(model, name, layer)
    return CompressionResult("dsformer", layers)
