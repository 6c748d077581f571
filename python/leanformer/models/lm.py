"""SLAB's language model: causal simplified linear attention with a causal DWC, PRepBN, tied
embeddings and constant-size incremental decoding; and its softmax (RoPE) + LayerNorm twin."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from leanformer.models.block import Block, apply_norm, make_norm, norm_fold_pairs
from leanformer.models.protocol import CausalLM, real_block
from leanformer.models.vit import _init_weights
from leanformer.nn import SLACache
from leanformer.ops import sla_tree_commit


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
    """Per-layer :class:`~leanformer.nn.SLACache` of a SLAB LM, one per remaining attention: its
    size is constant in the sequence length (the SLA state and the DWC's last
    ``kernel_size - 1`` values). ``tree_kv`` holds, per layer, the last token tree's ``(k, v)``
    until :meth:`commit`."""

    layers: List[SLACache] = field(default_factory=list)
    tree_kv: List[Optional[Tuple[Tensor, Tensor]]] = field(default_factory=list, repr=False)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def commit(self, accepted: Tensor, num_accepted: Tensor) -> None:
        """Keeps a verified tree's accepted path (``accepted [B, n]`` node indices root first,
        ``num_accepted [B]``, as ``ops.verify_tree_greedy`` returns them): its nodes'
        ``phi(k)^T v`` and ``phi(k)`` are added to every layer's state and its V ends the conv
        tail, the state plain decoding of those tokens leaves, without running them again (one
        op for every layer, ``ops.sla_tree_commit``)."""
        kept = [(layer, kv) for layer, kv in zip(self.layers, self.tree_kv) if kv is not None]
        if kept:
            layers = [layer for layer, _ in kept]
            tails = [layer.conv_tail for layer in layers] if all(l.conv_tail is not None for l in layers) else []
            sla_tree_commit([l.state[0] for l in layers], [l.state[1] for l in layers], tails,
                            [kv[0] for _, kv in kept], [kv[1] for _, kv in kept], accepted, num_accepted)
        self.tree_kv = []

    def select(self, rows: Tensor) -> None:
        """Keeps only the sequences ``rows`` (int64 ``[B']``) of every layer's state."""
        for layer in self.layers:
            if layer.state is None:
                continue
            S, z = layer.state
            layer.state = (S[rows], z[rows])
            if layer.conv_tail is not None and layer.conv_tail.numel():
                n = layer.conv_tail.shape[0] // S.shape[0]
                layer.conv_tail = layer.conv_tail.view(S.shape[0], n, *layer.conv_tail.shape[1:])[rows].flatten(0, 1)
        self.tree_kv = []


class SLABLM(CausalLM):
    """``input_ids [B, T]`` (int64) -> logits ``[B, T, vocab_size]``.

    ``forward(input_ids, cache=model.new_cache())`` decodes incrementally (SLA only): a prefill
    followed by single tokens equals the full causal forward. ``mask`` (bool ``[B, T]``, right
    padding false) keeps padding out of the BatchNorm statistics. Token trees (tree-verified
    decoding) run over the recurrent state (:meth:`tree_context`): a node reads the prefix
    state plus its own branch and convolves V along its ancestors; :meth:`LMCache.commit`
    then folds the accepted path into the state.

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

    def new_cache(self, batch: Optional[int] = None, max_len: Optional[int] = None) -> LMCache:
        """An empty cache, one :class:`~leanformer.nn.SLACache` per remaining attention (a block
        whose attention was dropped has none). ``batch`` and ``max_len`` are not needed: the
        state takes its batch from the first call and does not grow."""
        if self.config.attention != "sla":
            raise ValueError("incremental decoding needs attention='sla' (the softmax twin has no cache)")
        return LMCache([SLACache() for s in self.attention_slots() if s is not None])

    def forward(self, input_ids: Tensor, *, cache: Optional[LMCache] = None,
                mask: Optional[Tensor] = None, exit_layer: Optional[int] = None,
                output_hidden_states: bool = False, return_hidden: bool = False):
        """``exit_layer=l``: the first l blocks then the shared final norm and head;
        ``output_hidden_states``: ``(logits, hidden_states)`` with the ``l + 1`` hidden states;
        ``return_hidden``: ``(logits, h)`` with ``h`` the final normed hidden state (what
        drafters read). See :meth:`~leanformer.models.LayerStack.stack_forward`."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        return self.stack_forward(input_ids, cache=cache, exit_layer=exit_layer,
                                  output_hidden_states=output_hidden_states, return_hidden=return_hidden, mask=mask)

    # ---- the layer-stack protocol (leanformer.models.LayerStack / CausalLM) ----

    def call_context(self, input_ids: Tensor, cache: Optional[LMCache] = None, mask: Optional[Tensor] = None) -> dict:
        return {"mask": mask, "slots": self._slots(cache), "tree": None}

    def _slots(self, cache: Optional[LMCache]) -> List[Optional[int]]:
        slots = self.attention_slots()
        if cache is not None:
            n = sum(s is not None for s in slots)
            if len(cache.layers) != n:
                raise ValueError(f"cache has {len(cache.layers)} layers, the model {n} attention layers: "
                                 "make it with model.new_cache()")
        return slots

    def embed_tokens(self, input_ids: Tensor, ctx: dict) -> Tensor:
        return self.embed(input_ids)

    def run_block(self, i: int, x: Tensor, cache: Optional[LMCache], ctx: dict) -> Tensor:
        s = ctx["slots"][i]
        slot = None if cache is None or s is None else cache.layers[s]
        if ctx["tree"] is None:
            return self.blocks[i](x, cache=slot, mask=ctx["mask"])
        kv = []
        x = self.blocks[i](x, cache=slot, tree=ctx["tree"], tree_kv=kv)
        if slot is not None:
            cache.tree_kv[s] = kv[0] if kv else None
        return x

    def fill_block_cache(self, i: int, x: Tensor, cache: Optional[LMCache], ctx: dict) -> None:
        s = ctx["slots"][i]
        if cache is not None and s is not None:
            block = real_block(self.blocks[i])
            block.attn(apply_norm(block.norm1, x, ctx["mask"]), cache=cache.layers[s])

    def final_norm(self, x: Tensor, ctx: Optional[dict] = None) -> Tensor:
        return apply_norm(self.norm, x, None if ctx is None else ctx.get("mask"))

    def apply_head(self, h: Tensor) -> Tensor:
        return self.lm_head(h)

    def prefill(self, cache: LMCache, input_ids: Tensor, lengths: Tensor) -> None:
        """The prompts of each length together (the recurrent state has no per-sequence length),
        then the states stacked along the batch in row order; an empty prompt leaves the zero
        state."""
        B = input_ids.shape[0]
        groups = {}
        for b, n in enumerate(lengths.tolist()):
            groups.setdefault(int(n), []).append(b)
        runs = []  # (rows, their cache)
        for n, rows in groups.items():
            if n:
                run = self.new_cache()
                self(input_ids[rows, :n], cache=run)
                runs.append((torch.tensor(rows, device=input_ids.device), run))
        p = self.embed.weight
        layers = []
        for s, i in enumerate(i for i, slot in enumerate(self.attention_slots()) if slot is not None):
            attn = real_block(self.blocks[i]).attn
            H, hd = attn.num_heads, attn.head_dim
            S = p.new_zeros(B, H, hd, hd, dtype=torch.float32)
            z = p.new_zeros(B, H, hd, dtype=torch.float32)
            tail = None if attn.dwc is None else p.new_zeros(B, H, hd, max(attn.kernel_size - 1, 0))
            for rows, run in runs:
                layer = run.layers[s]
                S[rows], z[rows] = layer.state[0].float(), layer.state[1].float()
                if tail is not None:
                    tail[rows] = layer.conv_tail.view(len(rows), H, hd, -1)
            layers.append(SLACache((S, z), None if tail is None else tail.flatten(0, 1), 0))
        cache.layers, cache.tree_kv = layers, []

    def tree_context(self, cache: LMCache, mask: Tensor, depths: Tensor, parents: Tensor) -> dict:
        if cache is None:
            raise ValueError("a SLABLM's token tree runs over a prefix state: pass a cache filled by model.prefill "
                             "(an empty prompt gives the zero state)")
        slots = self._slots(cache)
        if len(cache.tree_kv) != len(cache.layers):
            cache.tree_kv = [None] * len(cache.layers)
        return {"mask": None, "slots": slots, "tree": (mask, parents)}

    def fold_pairs(self):
        # Folding into a tied head unties it: fold_batchnorm gives lm_head its own weight.
        return norm_fold_pairs(self, [("norm", ["lm_head"], "forward")])
