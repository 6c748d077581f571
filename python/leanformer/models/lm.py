"""SLAB's language model: causal simplified linear attention with a causal DWC, PRepBN, tied
embeddings and constant-size incremental decoding; and its softmax (RoPE) + LayerNorm twin."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor, nn

from leanformer.models.block import Block, apply_norm, make_norm, norm_fold_pairs
from leanformer.models.vit import _init_weights
from leanformer.nn import SLACache


@dataclass
class LMConfig:
    """Sizes and variant of :class:`SLABLM` (``attention="sla", norm="prepbn"``: SLAB;
    :meth:`twin`: softmax attention with rotary positions and LayerNorm, same sizes).

    ``norm_alpha_init``/``norm_weight_init`` are RepBN's alpha and BN weight at init (SLAB's
    LLM variant uses 0 for both; 1 trains faster from scratch in short runs).
    """

    vocab_size: int = 256
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dwc_kernel_size: int = 4
    tie_embeddings: bool = True
    attention: str = "sla"
    norm: str = "prepbn"
    prepbn_steps: int = 1000
    prepbn_warmup: int = 0
    norm_alpha_init: float = 1.0
    norm_weight_init: float = 1.0

    def twin(self) -> "LMConfig":
        return dataclasses.replace(self, attention="softmax", norm="layernorm")


@dataclass
class LMCache:
    """Per-layer :class:`~leanformer.nn.SLACache` of a SLAB LM: its size is constant in the
    sequence length (the SLA state and the DWC's last ``kernel_size - 1`` values)."""

    layers: List[SLACache] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class SLABLM(nn.Module):
    """``input_ids [B, T]`` (int64) -> logits ``[B, T, vocab_size]``.

    ``forward(input_ids, cache=model.new_cache())`` decodes incrementally (SLA only): a prefill
    followed by single tokens equals the full causal forward. ``mask`` (bool ``[B, T]``, right
    padding false) keeps padding out of the BatchNorm statistics.

    Example::

        >>> model = SLABLM(LMConfig(dim=64, depth=2, num_heads=2)).eval()
        >>> ids = torch.randint(0, 256, (1, 12))
        >>> cache = model.new_cache()
        >>> steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
        >>> torch.allclose(torch.cat(steps, 1), model(ids), atol=1e-4)
        True
    """

    model_type = "slab_lm"

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        norm_kwargs = {}
        if c.norm in ("prepbn", "repbn"):
            norm_kwargs = {"alpha_init": c.norm_alpha_init, "weight_init": c.norm_weight_init}
        if c.norm == "prepbn":
            norm_kwargs.update(total_steps=c.prepbn_steps, warmup_steps=c.prepbn_warmup)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, int(c.dim * c.mlp_ratio), attention=c.attention, norm=c.norm,
                  causal=True, dwc_kernel_size=c.dwc_kernel_size, activation=c.activation,
                  norm_kwargs=norm_kwargs)
            for _ in range(c.depth))
        self.norm = make_norm(c.norm, c.dim, **norm_kwargs)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(_init_weights)
        nn.init.normal_(self.embed.weight, std=0.02)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_cache(self) -> LMCache:
        if self.config.attention != "sla":
            raise ValueError("incremental decoding needs attention='sla' (the softmax twin has no cache)")
        # One slot per attention: a block whose attention was dropped (drop_modules) has none.
        return LMCache([SLACache() for b in self.blocks if b.attn is not None])

    def forward(self, input_ids: Tensor, *, cache: Optional[LMCache] = None,
                mask: Optional[Tensor] = None, exit_layer: Optional[int] = None,
                output_hidden_states: bool = False, return_hidden: bool = False):
        """``exit_layer=l``: the first l blocks then the shared final norm and head;
        ``output_hidden_states``: ``(logits, hidden_states)`` with the ``l + 1`` hidden states
        (see :func:`leanformer.layers.forward`); ``return_hidden``: ``(logits, h)`` with ``h`` the
        final normed hidden state (what drafters read)."""
        from leanformer.layers import forward

        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if return_hidden:
            if output_hidden_states:
                raise ValueError("return_hidden and output_hidden_states do not go together")
            logits, hidden = forward(self, input_ids, cache=cache, mask=mask, exit_layer=exit_layer,
                                     output_hidden_states=True)
            return logits, apply_norm(self.norm, hidden[-1], mask)
        return forward(self, input_ids, cache=cache, mask=mask, exit_layer=exit_layer,
                       output_hidden_states=output_hidden_states)

    def fold_pairs(self):
        # Folding into a tied head unties it: fold_batchnorm gives lm_head its own weight.
        return norm_fold_pairs(self, [("norm", ["lm_head"], "forward")])
