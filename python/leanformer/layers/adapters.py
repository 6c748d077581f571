"""The layer-stack adapters of the project's models (see :mod:`leanformer.layers.stack`)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from leanformer.layers.stack import StackAdapter, attention_slots, register_adapter
from leanformer.models.block import apply_norm


class PreNormLMAdapter(StackAdapter):
    """:class:`~leanformer.models.SLABLM` and its softmax twin: ``embed``, pre-norm
    :class:`~leanformer.models.block.Block` s, ``norm``, ``lm_head``; one
    :class:`~leanformer.nn.SLACache` per remaining attention in ``cache.layers``."""

    _parts = {"attention": ("norm1", "attn"), "mlp": ("norm2", "mlp")}

    def embed(self, model, input_ids, ctx):
        return model.embed(input_ids)

    def _slot(self, model, i, cache):
        if cache is None:
            return None
        slots = attention_slots(model)
        n = sum(s is not None for s in slots)
        if len(cache.layers) != n:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {n} attention layers: "
                             "make it with model.new_cache()")
        return None if slots[i] is None else cache.layers[slots[i]]

    def block(self, model, i, x, cache, ctx):
        return model.blocks[i](x, cache=self._slot(model, i, cache), mask=ctx.get("mask"))

    def head(self, model, x, ctx):
        return model.lm_head(apply_norm(model.norm, x, ctx.get("mask")))

    def fill_cache(self, model, i, x, cache, ctx):
        block, slot = model.blocks[i], self._slot(model, i, cache)
        if slot is not None:
            block.attn(apply_norm(block.norm1, x, ctx.get("mask")), cache=slot)

    def sublayer(self, block, kind):
        return getattr(block, self._parts[kind][1], None)

    def drop(self, block, kind) -> Dict[str, Optional[nn.Module]]:
        removed = {name: getattr(block, name) for name in self._parts[kind]}
        for name in removed:
            setattr(block, name, None)
        return removed


class BertAdapter(StackAdapter):
    """:class:`~leanformer.models.BertEncoder`: embeddings, post-norm blocks, no head (the
    output is the hidden state itself). ``ctx``: ``attention_mask``, ``token_type_ids``."""

    def embed(self, model, input_ids, ctx):
        token_types = ctx.get("token_type_ids")
        return model.embeddings(input_ids, torch.zeros_like(input_ids) if token_types is None else token_types)

    def block(self, model, i, x, cache, ctx):
        mask = ctx.get("attention_mask")
        mask = None if mask is None or bool(mask.all()) else mask.to(torch.bool)
        return model.blocks[i](x, mask)

    def head(self, model, x: Tensor, ctx):
        return x

    def sublayer(self, block, kind):
        return getattr(block, {"attention": "attn", "mlp": "mlp"}[kind])

    def drop(self, block, kind):
        raise NotImplementedError("dropping sub-blocks of a post-norm BERT block is not supported "
                                  "(its LayerNorm sits on the residual stream)")


register_adapter("slab_lm", PreNormLMAdapter())
register_adapter("bert", BertAdapter())
