"""The probability warp (temperature, top-k, top-p) that plain sampling and tree verification
share, so the two sample the same distribution."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def warp_logits(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``logits [..., V]``, in fp32; removed
    tokens get -inf. Plain sampling and tree verification both warp with this.

    top-p keeps the most probable tokens until the mass before the next one reaches top_p
    (at least one token), as Hugging Face's TopPLogitsWarper does."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling (use greedy decoding for 0), got {temperature}")
    x = logits.float() / temperature
    V = x.shape[-1]
    if top_k is not None:
        if not 1 <= top_k:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < V:
            kth = x.topk(top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1:
            sorted_x, order = x.sort(dim=-1, descending=True)
            p = sorted_x.softmax(-1)
            mass_before = p.cumsum(-1) - p
            drop = mass_before >= top_p
            drop[..., 0] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def warp_probs(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None) -> Tensor:
    """``softmax(warp_logits(logits, ...))`` in fp32: the distribution a sampler draws from."""
    return warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
