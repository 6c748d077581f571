"""What generate() needs from a model, for each model family: a prefill, a plain decode step,
a token-tree forward over the cached prefix, and committing the accepted path. The
transformer keeps a KV cache (tree K/V appended, then compacted); the SLAB LM keeps a
recurrent state (tree nodes read it without changing it, the accepted path is then run into it)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from leanformer.decoding.token_tree import TokenTree
from leanformer.ops.tree_decoding import compact_kv_cache


class LlamaRunner:
    """Drives a :class:`~leanformer.models.LlamaLM` and its :class:`~leanformer.models.KVCache`."""

    def __init__(self, model, batch: int, max_len: int):
        self.model = model
        self.cache = model.new_cache(batch, max_len)

    def prefill(self, ids: Tensor, lengths: Tensor) -> None:
        if ids.shape[1]:
            self.model(ids, cache=self.cache, lengths=lengths)

    def step(self, tokens: Tensor) -> Tensor:
        """Plain decoding: logits ``[B, V]`` of ``tokens [B]``, appended to the cache."""
        return self.model(tokens[:, None], cache=self.cache)[:, 0]

    def tree(self, tree: TokenTree) -> Tuple[Tensor, Tensor]:
        """``(logits [B, T, V], final hidden states [B, T, C])`` of the tree's nodes."""
        return self.model(tree.tokens.clamp(min=0), cache=self.cache, tree_mask=tree.mask, depths=tree.depths,
                          return_hidden=True)

    # the pieces of a tree forward, for drafters that enter or leave midway (Hidden Transfer)
    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.embed(tokens)

    def tree_layers(self, x: Tensor, mask: Tensor, depths: Tensor, parents: Tensor, start: int = 0,
                    stop: Optional[int] = None) -> Tensor:
        """Nodes ``x [B, N, C]`` (ancestor ``mask``, ``depths``) through ``layers[start:stop]``
        over the cached prefix; their K/V land in the scratch slots past ``cache.lens``."""
        return self.model.run_layers(x, self.cache.lens[:, None] + depths, cache=self.cache, tree_mask=mask,
                                     start=start, stop=stop)

    def head(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.model.norm(h)
        return self.model.lm_head(h), h

    def commit(self, tree: TokenTree, accepted: Tensor, num_accepted: Tensor) -> None:
        lens = self.cache.lens
        for k, v in zip(self.cache.k, self.cache.v):
            layer_lens = lens.clone()  # compact_kv_cache advances the lengths it is given
            compact_kv_cache(k, v, layer_lens, accepted, num_accepted)
        self.cache.lens = layer_lens

    def select(self, rows: Tensor) -> None:
        """Keeps only the sequences ``rows`` (the others finished)."""
        c = self.cache
        c.k, c.v, c.lens = [t[rows] for t in c.k], [t[rows] for t in c.v], c.lens[rows]


class SLABRunner:
    """Drives a :class:`~leanformer.models.SLABLM` (causal SLA with a causal depthwise conv of V)
    and its recurrent :class:`~leanformer.models.LMCache`.

    A tree node reads the prefix state plus its own branch (``ops.tree_linear_attention``) and
    convolves V along its ancestor chain, continued into the cached tail of the prefix. The
    tree forward keeps every layer's K/V; committing adds the accepted path's
    ``phi(k)^T v`` and ``phi(k)`` to each layer's state and takes the conv tail from the path:
    what plain decoding of those tokens would have left, without running them again.
    """

    def __init__(self, model, batch: int):
        from leanformer.models.lm import LMCache

        if model.config.attention != "sla":
            raise ValueError("tree decoding of a SLABLM needs attention='sla' (the softmax twin has no cache)")
        self.model, self.batch = model, batch
        self.cache = LMCache([])
        self._tree_kv = None

    def _empty_state(self, rows: int):
        attn = self.model.blocks[0].attn
        H, hd, p = attn.num_heads, attn.head_dim, self.model.embed.weight
        ks = max(attn.kernel_size - 1, 0)
        return (p.new_zeros(rows, H, hd, hd, dtype=torch.float32), p.new_zeros(rows, H, hd, dtype=torch.float32),
                p.new_zeros(rows * H, hd, ks))

    def prefill(self, ids: Tensor, lengths: Tensor) -> None:
        """Each prompt alone (the recurrent state has no per-sequence length), then stacked."""
        from leanformer.nn import SLACache

        per_row = []
        for b in range(ids.shape[0]):
            cache = self.model.new_cache()
            n = int(lengths[b])
            if n:
                self.model(ids[b:b + 1, :n], cache=cache)
            per_row.append(cache)
        layers = []
        for i in range(len(self.model.blocks)):
            S, z, tail = [], [], []
            for c in per_row:
                layer = c.layers[i]
                s0, z0, t0 = self._empty_state(1)
                st = layer.state if layer.state is not None else (s0, z0)
                S.append(st[0].float())
                z.append(st[1].float())
                tail.append(layer.conv_tail if layer.conv_tail is not None else t0)
            layers.append(SLACache((torch.cat(S), torch.cat(z)), torch.cat(tail), 0))
        self.cache.layers = layers

    def step(self, tokens: Tensor) -> Tensor:
        return self.model(tokens[:, None], cache=self.cache)[:, 0]

    def tree(self, tree: TokenTree) -> Tuple[Tensor, Tensor]:
        x = self.tree_layers(self.embed(tree.tokens.clamp(min=0)), tree.mask, tree.depths, tree.parents)
        return self.head(x)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.embed(tokens)

    def head(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        from leanformer.models.block import apply_norm

        h = apply_norm(self.model.norm, h, None)
        return self.model.lm_head(h), h

    def tree_layers(self, x: Tensor, mask: Tensor, depths: Tensor, parents: Tensor, start: int = 0,
                    stop: Optional[int] = None) -> Tensor:
        """Nodes ``x [B, N, C]`` (ancestor ``mask``, ``parents``) through ``blocks[start:stop]``
        on top of the prefix state; each layer's K/V is kept for :meth:`commit` (which reads the
        accepted real nodes, the first T)."""
        from leanformer.models.block import apply_norm
        from leanformer.ops.tree_decoding import tree_dwconv, tree_linear_attention

        m = self.model
        B, T = x.shape[:2]
        if start == 0:
            self._tree_kv = []
        for block, layer in zip(m.blocks[start:stop], self.cache.layers[start:stop]):
            attn = block.attn
            H, hd = attn.num_heads, attn.head_dim
            q, k, v = attn.qkv(apply_norm(block.norm1, x, None)).view(B, T, 3, H, hd).unbind(2)
            S, z = layer.state
            o = tree_linear_attention(q, k, v, S, z, mask, eps=attn.eps)
            if attn.dwc is not None:  # the causal conv of V along each node's branch, then the prefix's tail
                o = o + tree_dwconv(v, layer.conv_tail.to(v.dtype), parents, attn.dwc.weight[:, 0], attn.dwc.bias)
            self._tree_kv.append((k, v))
            x = x + attn.proj(o.reshape(B, T, -1))
            x = x + block.mlp(apply_norm(block.norm2, x, None))
        return x

    def commit(self, tree: TokenTree, accepted: Tensor, num_accepted: Tensor) -> None:
        """One op for every layer (``ops.sla_tree_commit``): the accepted path's K/V into the
        state, its V into the conv tail; ~40 small PyTorch ops per step before."""
        from leanformer.ops.tree_decoding import sla_tree_commit

        layers = self.cache.layers
        S, z = [layer.state[0] for layer in layers], [layer.state[1] for layer in layers]
        tails = [layer.conv_tail for layer in layers] if self.model.blocks[0].attn.dwc is not None else []
        sla_tree_commit(S, z, tails, [k for k, _ in self._tree_kv], [v for _, v in self._tree_kv], accepted,
                        num_accepted)
        self._tree_kv = None

    def select(self, rows: Tensor) -> None:
        for layer in self.cache.layers:
            S, z = layer.state
            layer.state = (S[rows], z[rows])
            if layer.conv_tail is not None and layer.conv_tail.numel():
                n = layer.conv_tail.shape[0] // S.shape[0]
                layer.conv_tail = layer.conv_tail.view(S.shape[0], n, *layer.conv_tail.shape[1:])[rows].flatten(0, 1)
