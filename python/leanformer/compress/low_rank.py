"""``low_rank(model, compression)``: the truncated-SVD baseline at the same storage budget."""
from __future__ import annotations

from torch import nn

from leanformer.compress.result import CompressionResult, LayerCompression
from leanformer.compress.selection import Modules, check_compression, replace_module, select_linears, value_bits
from leanformer.compress.storage import dense_bits, largest_rank, low_rank_bits
from leanformer.nn.low_rank_linear import LowRankLinear


def low_rank_rank(linear: nn.Linear, compression: float) -> int:
    """The largest rank whose two factors + bias fit the dense layer's storage over
    ``compression`` (0 if even rank 1 is too big)."""
    out_f, in_f, bias, bits = linear.out_features, linear.in_features, linear.bias is not None, value_bits(linear)
    budget = dense_bits(out_f, in_f, bias, bits) / compression
    return largest_rank(lambda r: low_rank_bits(out_f, in_f, r, bias, bits), budget, min(out_f, in_f))


def low_rank(model: nn.Module, compression: float, *, modules: Modules = None) -> CompressionResult:
    """Replace the chosen Linear layers (in place) by :class:`LowRankLinear` truncated SVDs of
    the largest rank whose storage (both factors + bias) meets ``compression`` per layer.
    ``modules`` as in :func:`leanformer.compress.dsformer`."""
    check_compression(compression)
    chosen = select_linears(model, modules)
    plan = {}
    for name, linear in chosen:
        out_f, in_f, bias, bits = linear.out_features, linear.in_features, linear.bias is not None, value_bits(linear)
        full = dense_bits(out_f, in_f, bias, bits)
        rank = low_rank_rank(linear, compression)
        if rank == 0:
            raise ValueError(f"{name} ({out_f}x{in_f}) cannot reach compression {compression} with a rank-1 factorization")
        plan[name] = (rank, full, low_rank_bits(out_f, in_f, rank, bias, bits))
    layers = {}
    for name, linear in chosen:
        rank, full, bits = plan[name]
        layer, err = LowRankLinear.from_linear(linear, rank)
        layers[name] = LayerCompression(full, bits, rank=rank, error=err)
        replace_module(model, name, layer)
    return CompressionResult("low_rank", layers)
