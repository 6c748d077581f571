"""Compressing a trained model's Linear layers: DSFormer (dense x N:M-sparse factorization) and
its two baselines at equal storage, truncated SVD and magnitude N:M pruning; and blockwise
4/8-bit quantization (BCT-style, no retraining)."""
from leanformer.compress.dsformer import dsformer, dsformer_rank
from leanformer.compress.low_rank import low_rank
from leanformer.compress.nm_prune import nearest_pattern, nm_prune, pattern_compression
from leanformer.compress.quantize import quantize
from leanformer.compress.result import CompressionResult, LayerCompression
from leanformer.compress.selection import select_linears
from leanformer.compress.straight_through import finalize_straight_through, to_straight_through

__all__ = ["CompressionResult", "LayerCompression", "dsformer", "dsformer_rank", "low_rank", "nearest_pattern",
           "nm_prune", "pattern_compression", "quantize", "select_linears", "finalize_straight_through", "to_straight_through"]
