"""The pre-norm transformer block shared by the SLAB models and their softmax twins."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor, nn

from leanformer.nn import MLP, PRepBN, RepBN, SimplifiedLinearAttention, SLACache, SoftmaxAttention
from leanformer.ops import tree_dwconv, tree_linear_attention

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
                cache: Optional[SLACache] = None, mask: Optional[Tensor] = None,
                tree: Optional[Tuple[Tensor, Tensor]] = None, tree_kv: Optional[list] = None) -> Tensor:
        """``x [B, T, C]`` -> ``[B, T, C]``. ``cache``: the attention's incremental state (SLA
        only); ``mask`` (bool ``[B, T]``, padding false): kept out of RepBN/PRepBN statistics.

        ``tree = (ancestor mask [B, T, T], parents [B, T])``: ``x`` holds a token tree's nodes
        over the prefix state in ``cache``, which is read and not changed: each node attends to
        the prefix state plus its own branch (``ops.tree_linear_attention``) and convolves V
        along its ancestors, continued into the prefix's cached tail (``ops.tree_dwconv``).
        The nodes' ``(k, v)`` (``[B, T, H, D]`` each) are appended to ``tree_kv``: what
        :meth:`~leanformer.models.LMCache.commit` folds into the state for the accepted path."""
        if self.attn is not None:  # None: dropped by leanformer.layers.drop_modules
            if tree is not None:
                x = x + self._tree_attention(apply_norm(self.norm1, x, mask), cache, *tree, tree_kv)
            else:
                h = apply_norm(self.norm1, x, mask)
                if isinstance(self.attn, SimplifiedLinearAttention):
                    h = self.attn(h, hw=hw, cache=cache) if not self.attn.causal else self.attn(h, cache=cache)
                else:
                    if cache is not None:
                        raise ValueError("incremental decoding (cache) needs attention='sla'")
                    h = self.attn(h)
                x = x + h
        return x if self.mlp is None else x + self.mlp(apply_norm(self.norm2, x, mask))

    def _tree_attention(self, h: Tensor, cache: Optional[SLACache], mask: Tensor, parents: Tensor,
                        tree_kv: Optional[list]) -> Tensor:
        attn = self.attn
        if not isinstance(attn, SimplifiedLinearAttention) or not attn.causal or cache is None or cache.state is None:
            raise ValueError("a token tree runs over a causal SLA attention's prefilled state (attention='sla', "
                             "a cache from model.new_cache filled by model.prefill)")
        B, T, _ = h.shape
        H, hd = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(h).view(B, T, 3, H, hd).unbind(2)
        S, z = cache.state
        o = tree_linear_attention(q, k, v, S, z, mask, eps=attn.eps)
        if attn.dwc is not None:
            o = o + tree_dwconv(v, cache.conv_tail.to(v.dtype), parents, attn.dwc.weight[:, 0], attn.dwc.bias)
        if tree_kv is not None:
            tree_kv.append((k, v))
        return attn.proj(o.reshape(B, T, -1))

    def fold_pairs(self):
        return norm_fold_pairs(self, [("norm1", ["attn.qkv"], "forward"), ("norm2", ["mlp.fc1"], "forward")])
