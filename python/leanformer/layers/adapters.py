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

    def embed(self, model, input_ids, cache, ctx):
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

    def embed(self, model, input_ids, cache, ctx):
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


class LlamaAdapter(PreNormLMAdapter):
    """:class:`~leanformer.models.LlamaLM`: ``embed``, ``layers`` (pre-norm
    :class:`~leanformer.models.llama.LlamaBlock` s), ``norm``, ``lm_head``; its
    :class:`~leanformer.models.KVCache` holds one K and V per remaining attention and one
    length per sequence, advanced once per call."""

    _parts = {"attention": ("attn_norm", "attn"), "mlp": ("mlp_norm", "mlp")}

    def blocks(self, model):
        return model.layers

    def new_cache(self, model, batch, max_len):
        return model.new_cache(batch, max_len)

    def embed(self, model, input_ids, cache, ctx):
        ctx["positions"] = model.positions(*input_ids.shape, cache, None)
        return model.embed(input_ids)

    def _kv(self, model, i, cache):
        if cache is None:
            return None, None, None
        slots = attention_slots(model)
        n = sum(s is not None for s in slots)
        if len(cache.k) != n:
            raise ValueError(f"cache has {len(cache.k)} layers, the model {n} attention layers: "
                             "make it with model.new_cache(batch)")
        return (None, None, None) if slots[i] is None else (cache.k[slots[i]], cache.v[slots[i]], cache.lens)

    def block(self, model, i, x, cache, ctx):
        return model.layers[i](x, ctx["positions"], *self._kv(model, i, cache))

    def head(self, model, x, ctx):
        return model.lm_head(model.norm(x))

    def finish(self, model, input_ids, cache, ctx):
        if cache is not None:
            cache.lens += input_ids.shape[1]

    def fill_cache(self, model, i, x, cache, ctx):
        from leanformer.models.llama import write_slots

        k_cache, v_cache, lens = self._kv(model, i, cache)
        if k_cache is not None:
            block = model.layers[i]
            _, k, v = block.attn.qkv(block.attn_norm(x), ctx["positions"])
            write_slots(k_cache, v_cache, lens, k, v)


register_adapter("slab_lm", PreNormLMAdapter())
register_adapter("llama_lm", LlamaAdapter())
register_adapter("bert", BertAdapter())
