"""``nm_prune(model, n, m)``: the magnitude N:M pruning baseline, weights stored packed. Its
compression is fixed by the pattern; ``nearest_pattern`` picks the one closest to a target."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from leanformer.compress.result import CompressionResult, LayerCompression
from leanformer.compress.selection import Modules, check_compression, replace_module, select_linears, value_bits
from leanformer.compress.storage import dense_bits, nm_sparse_bits
from leanformer.nn.nm_sparse_linear import NMSparseLinear
from leanformer.sparse import SUPPORTED_M

ALL_PATTERNS = tuple((n, m) for m in SUPPORTED_M for n in range(1, m))


def pattern_compression(n: int, m: int, value_bits: int = 32, in_features: int = 4096) -> float:
    """Dense bits over packed bits of an N:M weight row of ``in_features`` (bias left out)."""
    return dense_bits(1, in_features, False, value_bits) / nm_sparse_bits(1, in_features, n, m, False, value_bits)


def nearest_pattern(compression: float, *, value_bits: int = 32, in_features: int = 4096,
                    patterns: Sequence[Tuple[int, int]] = ALL_PATTERNS) -> Tuple[int, int]:
    """The ``(n, m)`` whose compression is nearest ``compression`` (the lower m on a tie)."""
    check_compression(compression)
    return min(patterns, key=lambda p: (abs(pattern_compression(*p, value_bits, in_features) - compression), p[1]))


def nm_prune(model: nn.Module, n: Optional[int] = None, m: Optional[int] = None, *,
             compression: Optional[float] = None, modules: Modules = None) -> CompressionResult:
    """Replace the chosen Linear layers (in place) by magnitude-pruned :class:`NMSparseLinear`
    (the n largest |w| of every m inputs, stored packed). Give the pattern ``n, m``, or a
    target ``compression`` and the nearest pattern (:func:`nearest_pattern`, from the first
    chosen layer's dtype and width) is used. Returns the achieved compression (values +
    metadata + bias against the dense layers)."""
    if (n is None) != (m is None) or (n is None) == (compression is None):
        raise ValueError("give either the pattern (n and m) or a target compression, not both")
    if n is None:
        first = select_linears(model, modules)[0][1]
        n, m = nearest_pattern(compression, value_bits=value_bits(first), in_features=first.in_features)
    chosen = select_linears(model, modules, multiple_of=m)
    layers = {}
    for name, linear in chosen:
        layer = NMSparseLinear.from_linear(linear, n=n, m=m)
        w = linear.weight.detach()
        err = ((w - layer.dense_weight()).norm() / w.norm()).item()
        layers[name] = LayerCompression(dense_bits(linear.out_features, linear.in_features, linear.bias is not None,
                                                   value_bits(linear)),
                                        layer.storage_bits(), error=err, pattern=f"{n}:{m}")
        replace_module(model, name, layer)
    return CompressionResult("nm_prune", layers)
