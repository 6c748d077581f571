"""A Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention) with a KV cache that
keeps one length per sequence, so batched decoding of prompts of different lengths and
tree-verified decoding (``leanformer.ops.tree_attention``) work on the same cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    """Sizes of :class:`LlamaLM`. ``mlp_hidden=None`` is Llama's ``8/3 * dim`` rounded up to a
    multiple of 32; ``num_kv_heads`` below ``num_heads`` is grouped-query attention."""

    vocab_size: int = 256
    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_hidden: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 32 * -(-(8 * self.dim // 3) // 32)

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")


@dataclass
class KVCache:
    """Per-layer keys and values ``k[i], v[i] [B, L_max, Hkv, D]`` and one filled length per
    sequence ``lens int64 [B]`` (the layout ``leanformer.ops.tree_attention`` and
    ``compact_kv_cache`` take). Slots at and beyond ``lens[b]`` are scratch space."""

    k: List[Tensor]
    v: List[Tensor]
    lens: Tensor

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def clone(self) -> "KVCache":
        return KVCache([t.clone() for t in self.k], [t.clone() for t in self.v], self.lens.clone())


def rotary_at(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE (rotate-half form) of ``x [B, T, H, D]`` at integer ``positions [B, T]``: the
    position of a token may differ per sequence (per-sequence cache lengths) and need not
    increase along T (tree nodes sit at ``cache_len + depth``)."""
    cos, sin = _rotary_tables(positions, x.shape[-1], base)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# The last (positions, D, base) and its cos/sin: every layer's q and k of one forward share the
# positions tensor, so a decoding step computes its tables once instead of 2 x depth times. The
# entry holds the tensor itself (its identity cannot be reused while cached) and its version,
# and is replaced as one tuple (a thread never reads another's key with its own tables).
# Inference tensors (torch.inference_mode) keep no version counter: a copy of their values is
# compared instead.
_ROTARY_LAST: list = [None]


def _rotary_tables(positions: Tensor, D: int, base: float):
    inference = positions.is_inference()
    key = (None if inference else positions._version, D, base)
    entry = _ROTARY_LAST[0]
    if entry is not None and entry[0] is positions and entry[1] == key \
            and (not inference or torch.equal(entry[3], positions)):
        return entry[2]
    inv_freq = base ** (-torch.arange(0, D, 2, device=positions.device, dtype=torch.float32) / D)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    tables = angles.cos()[:, :, None], angles.sin()[:, :, None]
    _ROTARY_LAST[0] = (positions, key, tables, positions.clone() if inference else None)
    return tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def swiglu_linears(self):
        """``(gate, up, down)``: :func:`leanformer.nn.packed_linears` runs gate, up and the silu
        product as one fused op (``ops.packed_swiglu``) while decoding."""
        return self.gate, self.up, self.down


class LlamaAttention(nn.Module):
    """Grouped-query attention with RoPE. Three ways to run (see :meth:`LlamaLM.forward`):
    causal over the input alone (or under a dense ``tree_mask``); causal over the cache plus the input (written into the cache at
    ``lens[b] + t``); or a token tree (``tree_mask``) over the cached prefix via
    ``leanformer.ops.tree_attention``, its K/V written at ``lens[b] + i`` for a later
    ``compact_kv_cache``."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_base = c.num_heads, c.num_kv_heads, c.head_dim, c.rope_base
        self.q_proj = nn.Linear(c.dim, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.dim, bias=False)

    def qkv(self, x: Tensor, positions: Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return rotary_at(q, positions, self.rope_base), rotary_at(k, positions, self.rope_base), v

    def forward(self, x: Tensor, positions: Tensor, k_cache: Optional[Tensor] = None,
                v_cache: Optional[Tensor] = None, lens: Optional[Tensor] = None,
                tree_mask: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, positions)
        if k_cache is None:  # no prefix: causal, or a dense tree mask (drafter training)
            mask = None if tree_mask is None else (tree_mask if tree_mask.dim() == 3 else tree_mask[None])[:, None]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True).transpose(1, 2)
        elif tree_mask is not None:
            from leanformer.ops import tree_attention

            o = tree_attention(q, k_cache, v_cache, lens, k, v, tree_mask)
            write_slots(k_cache, v_cache, lens, k, v)
        else:
            write_slots(k_cache, v_cache, lens, k, v)
            Lk = int(lens.max()) + T
            slots = torch.arange(Lk, device=x.device)
            # query t of sequence b sees slots 0 .. lens[b] + t (its prefix, then itself causally)
            visible = slots[None, None, :] <= (lens[:, None, None] + torch.arange(T, device=x.device)[None, :, None])
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :Lk].transpose(1, 2),
                                               v_cache[:, :Lk].transpose(1, 2), attn_mask=visible[:, None],
                                               enable_gqa=True).transpose(1, 2)
        return self.o_proj(o.reshape(B, T, -1))


def write_slots(k_cache: Tensor, v_cache: Tensor, lens: Tensor, k: Tensor, v: Tensor) -> None:
    """``k_cache[b, lens[b] + t] = k[b, t]`` (and v) for every sequence b and token t."""
    B, T = k.shape[:2]
    if int(lens.max()) + T > k_cache.shape[1]:
        raise ValueError(f"the KV cache holds {k_cache.shape[1]} positions; {int(lens.max())} cached + {T} new do "
                         "not fit (make it with a larger max_len)")
    idx = (lens[:, None] + torch.arange(T, device=k.device)[None, :])  # [B, T]
    b = torch.arange(B, device=k.device)[:, None].expand(B, T)
    k_cache[b, idx] = k.to(k_cache.dtype)
    v_cache[b, idx] = v.to(v_cache.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = LlamaAttention(c)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.hidden)

    def forward(self, x: Tensor, positions: Tensor, k_cache=None, v_cache=None, lens=None, tree_mask=None) -> Tensor:
        if self.attn is not None:  # None: dropped by leanformer.layers.drop_modules
            x = x + self.attn(self.attn_norm(x), positions, k_cache, v_cache, lens, tree_mask)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """``input_ids [B, T]`` (int64) -> logits ``[B, T, vocab_size]``; the structure is plain:
    ``embed``, ``layers`` (a ModuleList of :class:`LlamaBlock`), ``norm``, ``lm_head``.

    ``forward(ids, cache=model.new_cache(B))`` decodes incrementally with a length per sequence:
    a prefill of right-padded prompts with ``lengths [B]`` (each sequence's cache advances by its
    own length; the padding's K/V is overwritten later), then steps, equals the full forward.
    With ``tree_mask`` ([T, T] or [B, T, T], ancestors and self) and ``depths`` ([T] or [B, T])
    the input is a token tree at positions ``lens + depth``; its K/V go to slots ``lens + i``
    and ``lens`` does not advance (``leanformer.ops.compact_kv_cache`` keeps the accepted path).

    Example::

        >>> model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2)).eval()
        >>> ids = torch.randint(0, 256, (2, 12))
        >>> cache = model.new_cache(2, 16)
        >>> steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
        >>> torch.allclose(torch.cat(steps, 1), model(ids), atol=1e-4)
        True
    """

    model_type = "llama_lm"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.depth))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream
        for block in self.layers:
            for lin in (block.attn.o_proj, block.mlp.down):
                nn.init.normal_(lin.weight, std=0.02 / (2 * c.depth) ** 0.5)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch: int, max_len: Optional[int] = None, *, device=None,
                  dtype: Optional[torch.dtype] = None) -> KVCache:
        c, p = self.config, self.embed.weight
        shape = (batch, max_len or c.max_seq_len, c.num_kv_heads, c.head_dim)
        kw = dict(device=device or p.device, dtype=dtype or p.dtype)
        n = len(self._kv_slots())  # one K/V per attention (drop_modules removes some)
        return KVCache([torch.zeros(shape, **kw) for _ in range(n)], [torch.zeros(shape, **kw) for _ in range(n)],
                       torch.zeros(batch, dtype=torch.long, device=kw["device"]))

    def _kv_slots(self) -> dict:
        """Layer index -> its K/V slot in the cache, for the layers that still have attention."""
        kept = [i for i, block in enumerate(self.layers) if getattr(block, "attn", None) is not None]
        return {i: s for s, i in enumerate(kept)}

    def positions(self, B: int, T: int, cache: Optional[KVCache], depths: Optional[Tensor]) -> Tensor:
        """Position ids ``[B, T]``: ``lens[b] + depth`` (depth ``t`` when not a tree)."""
        device = self.embed.weight.device
        offs = torch.arange(T, device=device) if depths is None else depths.to(device)
        offs = offs.expand(B, T) if offs.dim() == 1 else offs
        return offs if cache is None else cache.lens[:, None] + offs

    def run_layers(self, x: Tensor, positions: Tensor, *, cache: Optional[KVCache] = None,
                   tree_mask: Optional[Tensor] = None, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Hidden states through ``layers[start:stop]`` (for drafters that enter or leave midway).
        Does not advance ``cache.lens``."""
        slots = self._kv_slots()
        for i in range(start, len(self.layers) if stop is None else stop):
            kv = (None, None, None) if cache is None or i not in slots else (cache.k[slots[i]], cache.v[slots[i]], cache.lens)
            x = self.layers[i](x, positions, *kv, tree_mask)
        return x

    def forward(self, input_ids: Tensor, *, cache: Optional[KVCache] = None, lengths: Optional[Tensor] = None,
                tree_mask: Optional[Tensor] = None, depths: Optional[Tensor] = None,
                return_hidden: bool = False, exit_layer: Optional[int] = None, output_hidden_states: bool = False):
        """Logits ``[B, T, V]`` (and the final normed hidden states when ``return_hidden``).
        ``exit_layer=l``: the first l layers then the shared final norm and head;
        ``output_hidden_states``: ``(logits, hidden_states)`` (see :func:`leanformer.layers.forward`)."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is not None:
            if len(cache.k) != len(self._kv_slots()) or cache.lens.shape != (B,):
                raise ValueError(f"cache must have {len(self._kv_slots())} layers and lens [{B}] (make it with "
                                 f"model.new_cache({B}))")
        if (tree_mask is None) != (depths is None):
            raise ValueError("tree_mask and depths go together (a token tree's ancestor mask and node depths)")
        if tree_mask is not None and cache is None:
            raise ValueError("a token tree (tree_mask) needs a cache holding its prefix")
        if lengths is not None:
            if cache is None or tree_mask is not None:
                raise ValueError("lengths (per-sequence prompt lengths) is for a prefill into a cache")
            if lengths.shape != (B,) or int(lengths.min()) < 0 or int(lengths.max()) > T:
                raise ValueError(f"lengths must be int64 [{B}] in 0..{T}, got {lengths.tolist()}")
        if exit_layer is not None or output_hidden_states:
            if tree_mask is not None or lengths is not None or return_hidden:
                raise ValueError("exit_layer/output_hidden_states take neither a token tree, lengths nor return_hidden")
            from leanformer.layers import forward

            return forward(self, input_ids, cache=cache, exit_layer=exit_layer, output_hidden_states=output_hidden_states)
        h = self.run_layers(self.embed(input_ids), self.positions(B, T, cache, depths), cache=cache, tree_mask=tree_mask)
        if cache is not None and tree_mask is None:
            cache.lens += T if lengths is None else lengths.to(cache.lens.device)
        h = self.norm(h)
        logits = self.lm_head(h)
        return (logits, h) if return_hidden else logits
