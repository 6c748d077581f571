"""Softmax multi-head attention (through scaled_dot_product_attention): the baseline that
SLAB's linear attention replaces, used by the models' softmax twins."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary(x: Tensor, offset: int = 0, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoPE, rotate-half form) of ``x [B, T, H, D]`` at positions
    ``offset .. offset + T - 1``; D even."""
    B, T, H, D = x.shape
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """``proj(softmax(q k^T / sqrt(d)) v)`` with the same qkv/proj layout as
    :class:`~leanformer.nn.SimplifiedLinearAttention`, so the two are the same size.

    Args:
        dim, num_heads: width and heads; causal: causal mask; rope: rotary positions on q, k
            (the language twin has no other position signal; SLA gets one from its causal DWC).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, rope: bool = False,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if rope and (dim // num_heads) % 2:
            raise ValueError(f"rope needs an even head dim, got {dim // num_heads}")
        self.dim, self.num_heads, self.causal, self.rope = dim, num_heads, causal, rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (optional, bool ``[B, T]``): True on the real tokens; padded keys are left
        out of every query's softmax (padded queries still get an output, to be ignored)."""
        B, T, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got {tuple(x.shape)}")
        attn_mask, causal = None, self.causal
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
            attn_mask = mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            if causal:  # scaled_dot_product_attention takes is_causal or a mask, not both
                attn_mask = attn_mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                causal = False
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).unbind(2)
        if self.rope:
            q, k = rotary(q), rotary(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=causal)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, rope={self.rope}"
