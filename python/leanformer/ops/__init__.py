"""Typed wrappers over torch.ops.leanformer, with fake kernels and autograd registered."""
from leanformer.ops.linear_attention import (
    simplified_linear_attention,
    simplified_linear_attention_step,
)

__all__ = ["simplified_linear_attention", "simplified_linear_attention_step"]
