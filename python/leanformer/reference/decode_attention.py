"""decode_attention written plainly in PyTorch: RoPE of the new token's q and k, the cache
write, and softmax attention over each sequence's filled slots. Shapes as in
:mod:`leanformer.ops.decode_attention`."""
from __future__ import annotations

import torch
from torch import Tensor


def decode_attention_reference(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, cos: Tensor,
                               sin: Tensor, num_heads: int) -> Tensor:
    """As ``leanformer.ops.decode_attention``, in place on the caches like it: q and k rotated in
    fp32 and rounded to qkv's dtype, k and v written at ``[b, lens[b]]``, then per sequence the
    attention over slots ``0..lens[b]`` (scores and softmax in fp32, fp64 for fp64 inputs)."""
    B, L, Hkv, D = k_cache.shape
    H, half = num_heads, D // 2
    x = qkv.reshape(B, H + 2 * Hkv, D)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    c, s = cos[lens].to(acc)[:, None], sin[lens].to(acc)[:, None]  # [B, 1, D]
    qk = x[:, :H + Hkv].to(acc)
    qk = (qk * c + torch.cat([qk[..., half:], qk[..., :half]], -1) * s).to(qkv.dtype)
    q, k, v = qk[:, :H], qk[:, H:], x[:, H + Hkv:]
    out = torch.empty(B, H, D, dtype=qkv.dtype, device=qkv.device)
    for b in range(B):
        n = int(lens[b])
        k_cache[b, n] = k[b].to(k_cache.dtype)
        v_cache[b, n] = v[b].to(v_cache.dtype)
        keys = k_cache[b, :n + 1].to(acc).repeat_interleave(H // Hkv, dim=1)  # [n + 1, H, D]
        values = v_cache[b, :n + 1].to(acc).repeat_interleave(H // Hkv, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].to(acc), keys) * D ** -0.5
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), values).to(qkv.dtype)
    return out.reshape(B, H * D)
