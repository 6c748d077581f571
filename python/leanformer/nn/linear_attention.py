"""The SLAB attention block: qkv projection, simplified linear attention, a depthwise
convolution of V added to the attention output, and the output projection."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.ops.linear_attention import (
    simplified_linear_attention,
    simplified_linear_attention_step,
)


@dataclass
class SLACache:
    """Incremental-decoding cache of one causal SimplifiedLinearAttention layer.

    ``state`` is the attention state ``(S [B, H, Dk, Dv], z [B, H, Dk])`` in fp32 and
    ``conv_tail`` the last ``kernel_size - 1`` values of V the causal convolution still needs
    (``[B * H, head_dim, kernel_size - 1]``). Its size does not grow with the sequence.
    """

    state: Optional[Tuple[Tensor, Tensor]] = None
    conv_tail: Optional[Tensor] = None
    length: int = 0


class SimplifiedLinearAttention(nn.Module):
    """SLAB's simplified linear attention block (Guo et al., ICML 2024).

    ``out = proj(SLA(q, k, v) + DWC(v))`` with ReLU features. ``causal=False`` (vision): DWC is
    a depthwise ``k x k`` Conv2d over the token grid ``hw = (H, W)`` (square by default), as
    SLAB-DeiT. ``causal=True`` (language): DWC is a causal depthwise Conv1d over tokens, and
    ``forward(x, cache=SLACache())`` decodes incrementally: a prefill then one token per call
    equals the full causal forward. The depthwise weights are shared by all heads.

    Args:
        dim: model width; num_heads: heads (``dim % num_heads == 0``).
        causal: causal attention and convolution.
        dwc_kernel_size: depthwise kernel size; 0 disables the convolution.
        qkv_bias: bias of the qkv projection.
        eps: added to the attention's denominator.

    Example::

        >>> attn = SimplifiedLinearAttention(64, 4, causal=True)
        >>> x = torch.randn(2, 10, 64)
        >>> cache = SLACache()
        >>> y = torch.cat([attn(x[:, :7], cache=cache)] +
        ...               [attn(x[:, t:t + 1], cache=cache) for t in range(7, 10)], 1)
        >>> torch.allclose(y, attn(x), atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False,
                 dwc_kernel_size: int = 5, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if dwc_kernel_size < 0 or (not causal and dwc_kernel_size and dwc_kernel_size % 2 == 0):
            raise ValueError(f"dwc_kernel_size must be 0 or a positive (odd, for the 2-D "
                             f"convolution) size, got {dwc_kernel_size}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal, self.eps, self.kernel_size = causal, eps, dwc_kernel_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        hd = self.head_dim
        if dwc_kernel_size == 0:
            self.dwc = None
        elif causal:
            self.dwc = nn.Conv1d(hd, hd, dwc_kernel_size, groups=hd)
        else:
            self.dwc = nn.Conv2d(hd, hd, dwc_kernel_size, groups=hd, padding=dwc_kernel_size // 2)

    def forward(self, x: Tensor, hw: Optional[Tuple[int, int]] = None,
                cache: Optional[SLACache] = None) -> Tensor:
        B, T, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must be [B, T, {self.dim}], got {tuple(x.shape)}")
        if cache is not None and not self.causal:
            raise ValueError("cache is only supported for causal=True")
        H, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, hd).unbind(2)
        if cache is None:
            o = simplified_linear_attention(q, k, v, causal=self.causal, eps=self.eps)
        elif T == 1 and cache.state is not None:
            o, cache.state = simplified_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], cache.state,
                                                              eps=self.eps)
            o = o.unsqueeze(1)
        else:
            o, cache.state = simplified_linear_attention(q, k, v, causal=True, eps=self.eps,
                                                         initial_state=cache.state,
                                                         output_final_state=True)
        if self.dwc is not None:
            o = o + self._depthwise(v, hw, cache)
        if cache is not None:
            cache.length += T
        return self.proj(o.reshape(B, T, C))

    def _depthwise(self, v: Tensor, hw: Optional[Tuple[int, int]], cache: Optional[SLACache]) -> Tensor:
        B, T, H, hd = v.shape
        if self.causal:
            seq = v.permute(0, 2, 3, 1).reshape(B * H, hd, T)
            pad = self.kernel_size - 1
            tail = cache.conv_tail if cache is not None else None
            if tail is None:
                tail = seq.new_zeros(B * H, hd, pad)
            seq = torch.cat([tail.to(seq.dtype), seq], dim=-1)
            if cache is not None:
                cache.conv_tail = seq[..., seq.shape[-1] - pad:]
            if T == 1:
                # A decoding step is one output per channel: a multiply-sum. nn.Conv1d's oneDNN
                # call costs about 150 us here whatever the size, more than the step's attention.
                out = (seq * self.dwc.weight[:, 0]).sum(-1, keepdim=True)
                out = out + self.dwc.bias[:, None] if self.dwc.bias is not None else out
            else:
                out = self.dwc(seq)
            return out.view(B, H, hd, T).permute(0, 3, 1, 2)
        gh, gw = hw if hw is not None else self._square_grid(T)
        if gh * gw != T:
            raise ValueError(f"hw={hw} does not cover the {T} tokens (H * W must equal T)")
        # All heads at once as one depthwise conv over C = H * hd channels in channels-last
        # layout (the [B, T, H, hd] layout of v itself), with the shared kernel repeated per
        # head: about 2x faster on CPU than [B * H, hd, gh, gw] and no transposes around it.
        C = H * hd
        img = v.reshape(B, gh, gw, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        bias = self.dwc.bias.repeat(H) if self.dwc.bias is not None else None
        out = F.conv2d(img, self.dwc.weight.repeat(H, 1, 1, 1), bias, padding=self.kernel_size // 2, groups=C)
        return out.permute(0, 2, 3, 1).reshape(B, T, H, hd)

    @staticmethod
    def _square_grid(T: int) -> Tuple[int, int]:
        side = math.isqrt(T)
        if side * side != T:
            raise ValueError(f"hw must be given for a non-square number of tokens ({T})")
        return side, side

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, "
                f"dwc_kernel_size={self.kernel_size}")
