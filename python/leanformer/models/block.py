"""The pre-norm transformer block shared by the SLAB models and their softmax twins."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from leanformer.nn import MLP, PRepBN, RepBN, SimplifiedLinearAttention, SLACache, SoftmaxAttention

NORMS = ("prepbn", "repbn", "layernorm")
ATTENTIONS = ("sla", "softmax")


def make_norm(kind: str, dim: int, *, total_steps: int = 0, warmup_steps: int = 0,
              alpha_init: float = 1.0, weight_init: float = 1.0) -> nn.Module:
    if kind == "prepbn":
        return PRepBN(dim, total_steps, warmup_steps, alpha_init=alpha_init, weight_init=weight_init)
    if kind == "repbn":
        return RepBN(dim, alpha_init=alpha_init, weight_init=weight_init)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def apply_norm(norm: nn.Module, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """RepBN/PRepBN take the padding mask for their statistics; LayerNorm (and the Identity a
    fold leaves) do not need it."""
    return norm(x, mask) if isinstance(norm, (RepBN, PRepBN)) else norm(x)


def norm_fold_pairs(owner: nn.Module, pairs: List[Tuple[str, List[str], str]]):
    """The (norm, linears, direction) pairs of ``owner`` whose norm is still a RepBN/PRepBN (a
    norm dropped with its sub-block is None)."""
    return [p for p in pairs if isinstance(_submodule_or_none(owner, p[0]), (RepBN, PRepBN))]


def _submodule_or_none(owner: nn.Module, name: str):
    *path, last = name.split(".")
    parent = owner.get_submodule(".".join(path)) if path else owner
    return getattr(parent, last, None)


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    attention "sla" is SLAB's simplified linear attention (with its DWC on V), "softmax" the
    baseline; norm "prepbn"/"repbn" fold into ``attn.qkv`` and ``mlp.fc1`` at inference.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, attention: str, norm: str,
                 causal: bool, dwc_kernel_size: int, activation: str = "gelu",
                 norm_kwargs: Optional[dict] = None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        norm_kwargs = norm_kwargs or {}
        self.norm1 = make_norm(norm, dim, **norm_kwargs)
        if attention == "sla":
            self.attn = SimplifiedLinearAttention(dim, num_heads, causal=causal,
                                                  dwc_kernel_size=dwc_kernel_size)
        else:
            self.attn = SoftmaxAttention(dim, num_heads, causal=causal, rope=causal)
        self.norm2 = make_norm(norm, dim, **norm_kwargs)
        self.mlp = MLP(dim, mlp_hidden, activation)

    def forward(self, x: Tensor, *, hw: Optional[Tuple[int, int]] = None,
                cache: Optional[SLACache] = None, mask: Optional[Tensor] = None) -> Tensor:
        if self.attn is not None:  # None: dropped by leanformer.layers.drop_modules
            h = apply_norm(self.norm1, x, mask)
            if isinstance(self.attn, SimplifiedLinearAttention):
                h = self.attn(h, hw=hw, cache=cache) if not self.attn.causal else self.attn(h, cache=cache)
            else:
                if cache is not None:
                    raise ValueError("incremental decoding (cache) needs attention='sla'")
                h = self.attn(h)
            x = x + h
        return x if self.mlp is None else x + self.mlp(apply_norm(self.norm2, x, mask))

    def fold_pairs(self):
        return norm_fold_pairs(self, [("norm1", ["attn.qkv"], "forward"), ("norm2", ["mlp.fc1"], "forward")])
