"""A Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention) with a KV cache that
keeps one length per sequence, so batched decoding of prompts of different lengths and
tree-verified decoding (``leanformer.ops.tree_attention``) work on the same cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.models.pretrained import load_llama
from leanformer.models.protocol import CausalLM, real_block
from leanformer.ops import compact_kv_cache, tree_attention


@dataclass
class LlamaConfig:
    """Sizes of :class:`LlamaLM`. ``mlp_hidden=None`` is Llama's ``8/3 * dim`` rounded up to a
    multiple of 32; ``num_kv_heads`` below ``num_heads`` is grouped-query attention.
    ``head_size=None`` is ``dim // num_heads`` (some checkpoints give another per-head width);
    ``qkv_bias`` adds biases to the query, key and value projections (Qwen2)."""

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
    head_size: Optional[int] = None
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.num_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 32 * -(-(8 * self.dim // 3) // 32)

    def validate(self) -> None:
        if self.head_size is None and self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim <= 0 or self.head_dim % 2:
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

    def commit(self, accepted: Tensor, num_accepted: Tensor) -> None:
        """Keeps a verified tree's accepted path (``accepted [B, T]`` node indices root first,
        ``num_accepted [B]``, as ``ops.verify_tree_greedy`` returns them): the tree forward wrote
        node i's K/V at slot ``lens[b] + i``; the accepted nodes' move to ``lens[b] + j`` and
        ``lens`` advances by ``num_accepted`` (``ops.compact_kv_cache``, per layer). The cache
        then holds what plain decoding of those tokens would have written."""
        lens = self.lens + num_accepted
        for k, v in zip(self.k, self.v):
            lens = self.lens.clone()  # compact_kv_cache advances the lengths it is given
            compact_kv_cache(k, v, lens, accepted, num_accepted)
        self.lens = lens

    def select(self, rows: Tensor) -> None:
        """Keeps only the sequences ``rows`` (int64 ``[B']``)."""
        self.k, self.v, self.lens = [t[rows] for t in self.k], [t[rows] for t in self.v], self.lens[rows]


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
    causal over the input alone (or under a dense ``tree_mask``); causal over the cache plus the
    input (written into the cache at ``lens[b] + t``); or a token tree (``tree_mask``) over the
    cached prefix via ``leanformer.ops.tree_attention``, its K/V written at ``lens[b] + i`` for
    a later ``compact_kv_cache``. :meth:`attend` is the attention itself, for callers that
    assemble their own queries, keys and mask (Hidden Transfer's training forward)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.rope_base = c.num_heads, c.num_kv_heads, c.head_dim, c.rope_base
        self.q_proj = nn.Linear(c.dim, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.dim, bias=False)

    def qkv(self, x: Tensor, positions: Tensor):
        """``x [B, T, C]`` at ``positions [B, T]`` -> rotated ``q [B, T, H, D]``, rotated
        ``k [B, T, Hkv, D]`` and ``v [B, T, Hkv, D]``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return rotary_at(q, positions, self.rope_base), rotary_at(k, positions, self.rope_base), v

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Queries ``q [B, Tq, H, D]`` against keys and values ``k, v [B, Tk, Hkv, D]``: softmax
        attention scaled by ``D ** -0.5``, query head h reading key head ``h // (H / Hkv)``
        (grouped-query, ``H % Hkv == 0``). ``mask``: broadcastable to ``[B, Tq, Tk]``, bool (true
        where query t may read key s) or float (added to the scores: 0 or -inf, faster on a CPU
        where one mask serves several calls); None: causal (``Tq == Tk``). -> ``[B, Tq, H, D]``
        (one ``F.scaled_dot_product_attention`` with ``enable_gqa``; differentiable)."""
        if mask is not None:
            mask = mask.unsqueeze(-3)  # one mask for every head
            mask = mask if mask.dim() == 4 else mask.view(1, *mask.shape[-3:])
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              is_causal=mask is None, enable_gqa=True).transpose(1, 2)

    def forward(self, x: Tensor, positions: Tensor, k_cache: Optional[Tensor] = None,
                v_cache: Optional[Tensor] = None, lens: Optional[Tensor] = None,
                tree_mask: Optional[Tensor] = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, positions)
        if k_cache is None:  # no prefix: causal, or a dense tree mask (drafter training)
            o = self.attend(q, k, v, tree_mask)
        elif tree_mask is not None:
            o = tree_attention(q, k_cache, v_cache, lens, k, v, tree_mask)
            write_slots(k_cache, v_cache, lens, k, v)
        else:
            write_slots(k_cache, v_cache, lens, k, v)
            Lk = int(lens.max()) + T
            slots = torch.arange(Lk, device=x.device)
            # query t of sequence b sees slots 0 .. lens[b] + t (its prefix, then itself causally)
            visible = slots[None, None, :] <= (lens[:, None, None] + torch.arange(T, device=x.device)[None, :, None])
            o = self.attend(q, k_cache[:, :Lk], v_cache[:, :Lk], visible)
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
    """Pre-norm: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``; a sub-block set to
    None (``leanformer.layers.drop_modules``) passes the residual stream unchanged."""

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


class LlamaLM(CausalLM):
    """``input_ids [B, T]`` (int64) -> logits ``[B, T, vocab_size]``; the structure is plain:
    ``embed``, ``layers`` (a ModuleList of :class:`LlamaBlock`), ``norm``, ``lm_head``.

    ``forward(ids, cache=model.new_cache(B))`` decodes incrementally with a length per sequence:
    a prefill of right-padded prompts with ``lengths [B]`` (each sequence's cache advances by its
    own length; the padding's K/V is overwritten later), then steps, equals the full forward.
    With ``tree_mask`` ([T, T] or [B, T, T], ancestors and self) and ``depths`` ([T] or [B, T])
    the input is a token tree at positions ``lens + depth``; its K/V go to slots ``lens + i``
    and ``lens`` does not advance (:meth:`KVCache.commit` keeps the accepted path).

    Example::

        >>> model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2)).eval()
        >>> ids = torch.randint(0, 256, (2, 12))
        >>> cache = model.new_cache(2, 16)
        >>> steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
        >>> torch.allclose(torch.cat(steps, 1), model(ids), atol=1e-4)
        True
    """

    model_type = "llama_lm"
    sublayer_attrs = {"attention": ("attn_norm", "attn"), "mlp": ("mlp_norm", "mlp")}

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
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32) -> "LlamaLM":
        """A pretrained Llama-family model (eval mode, on the CPU, in ``dtype``) from a Hugging
        Face folder (``config.json`` and ``*.safetensors``, sharded or not: Llama, SmolLM,
        Mistral without a sliding window, Qwen2) or a ``.gguf`` file (architecture ``llama``;
        F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors, dequantized). The model is built on the
        meta device and takes the checkpoint's tensors, so nothing is initialized twice. A
        config this model cannot represent (rope scaling, a sliding window, experts, another
        architecture, biases other than q/k/v, another activation) raises ValueError naming
        the field; a missing or mis-shaped tensor raises ValueError naming the tensor. Needs
        the optional dependencies: ``pip install "leanformer[hf]"``.

        Example::

            model = LlamaLM.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
            tokenizer = leanformer.models.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
        """
        return load_llama(path, cls, LlamaConfig, dtype=dtype)

    def new_cache(self, batch: int, max_len: Optional[int] = None, *, device=None,
                  dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens
        (``config.max_seq_len`` by default), one K/V per remaining attention, on the model's
        device and in its dtype unless given."""
        c, p = self.config, self.embed.weight
        shape = (batch, max_len or c.max_seq_len, c.num_kv_heads, c.head_dim)
        kw = dict(device=device or p.device, dtype=dtype or p.dtype)
        n = sum(s is not None for s in self.attention_slots())  # drop_modules removes some
        return KVCache([torch.zeros(shape, **kw) for _ in range(n)], [torch.zeros(shape, **kw) for _ in range(n)],
                       torch.zeros(batch, dtype=torch.long, device=kw["device"]))

    def positions(self, B: int, T: int, cache: Optional[KVCache], depths: Optional[Tensor]) -> Tensor:
        """Position ids ``[B, T]``: ``lens[b] + depth`` (depth ``t`` when not a tree)."""
        device = self.embed.weight.device
        offs = torch.arange(T, device=device) if depths is None else depths.to(device)
        offs = offs.expand(B, T) if offs.dim() == 1 else offs
        return offs if cache is None else cache.lens[:, None] + offs

    def forward(self, input_ids: Tensor, *, cache: Optional[KVCache] = None, lengths: Optional[Tensor] = None,
                tree_mask: Optional[Tensor] = None, depths: Optional[Tensor] = None,
                return_hidden: bool = False, exit_layer: Optional[int] = None, output_hidden_states: bool = False):
        """Logits ``[B, T, V]`` (and the final normed hidden states when ``return_hidden``).
        ``exit_layer=l``: the first l layers then the shared final norm and head;
        ``output_hidden_states``: ``(logits, hidden_states)``. See
        :meth:`~leanformer.models.LayerStack.stack_forward`."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if (tree_mask is None) != (depths is None):
            raise ValueError("tree_mask and depths go together (a token tree's ancestor mask and node depths)")
        if tree_mask is not None and cache is None:
            raise ValueError("a token tree (tree_mask) needs a cache holding its prefix")
        if lengths is not None:
            if cache is None or tree_mask is not None:
                raise ValueError("lengths (per-sequence prompt lengths) is for a prefill into a cache")
            if lengths.shape != (B,) or int(lengths.min()) < 0 or int(lengths.max()) > T:
                raise ValueError(f"lengths must be int64 [{B}] in 0..{T}, got {lengths.tolist()}")
        if (exit_layer is not None or output_hidden_states) and (tree_mask is not None or lengths is not None
                                                                 or return_hidden):
            raise ValueError("exit_layer/output_hidden_states take neither a token tree, lengths nor return_hidden")
        return self.stack_forward(input_ids, cache=cache, exit_layer=exit_layer,
                                  output_hidden_states=output_hidden_states, return_hidden=return_hidden,
                                  lengths=lengths, tree_mask=tree_mask, depths=depths)

    # ---- the layer-stack protocol (leanformer.models.LayerStack / CausalLM) ----

    def stack_blocks(self) -> nn.ModuleList:
        return self.layers

    def call_context(self, input_ids: Tensor, cache: Optional[KVCache] = None, lengths: Optional[Tensor] = None,
                     tree_mask: Optional[Tensor] = None, depths: Optional[Tensor] = None) -> dict:
        B, T = input_ids.shape
        slots = self._slots(cache, B)  # checks the cache first
        return {"positions": self.positions(B, T, cache, depths), "slots": slots, "tree_mask": tree_mask,
                "lengths": lengths}

    def _slots(self, cache: Optional[KVCache], B: int) -> List[Optional[int]]:
        slots = self.attention_slots()
        if cache is not None:
            n = sum(s is not None for s in slots)
            if len(cache.k) != n or cache.lens.shape != (B,):
                raise ValueError(f"cache must have {n} layers and lens [{B}] (make it with model.new_cache({B}))")
        return slots

    def embed_tokens(self, input_ids: Tensor, ctx: dict) -> Tensor:
        return self.embed(input_ids)

    def run_block(self, i: int, x: Tensor, cache: Optional[KVCache], ctx: dict) -> Tensor:
        s = ctx["slots"][i]
        if cache is None or s is None:
            return self.layers[i](x, ctx["positions"], None, None, None, ctx["tree_mask"])
        return self.layers[i](x, ctx["positions"], cache.k[s], cache.v[s], cache.lens, ctx["tree_mask"])

    def fill_block_cache(self, i: int, x: Tensor, cache: Optional[KVCache], ctx: dict) -> None:
        s = ctx["slots"][i]
        if cache is not None and s is not None:
            block = real_block(self.layers[i])
            _, k, v = block.attn.qkv(block.attn_norm(x), ctx["positions"])
            write_slots(cache.k[s], cache.v[s], cache.lens, k, v)

    def finish_call(self, cache: Optional[KVCache], ctx: dict) -> None:
        if cache is not None and ctx["tree_mask"] is None:
            lengths = ctx["lengths"]
            cache.lens += ctx["positions"].shape[1] if lengths is None else lengths.to(cache.lens.device)

    def final_norm(self, x: Tensor, ctx: Optional[dict] = None) -> Tensor:
        return self.norm(x)

    def apply_head(self, h: Tensor) -> Tensor:
        return self.lm_head(h)

    def prefill(self, cache: KVCache, input_ids: Tensor, lengths: Tensor) -> None:
        if input_ids.shape[1]:
            self(input_ids, cache=cache, lengths=lengths)

    def tree_context(self, cache: Optional[KVCache], mask: Tensor, depths: Tensor, parents: Tensor) -> dict:
        """As :meth:`~leanformer.models.CausalLM.tree_context`; ``cache`` None runs the nodes
        under the dense ``mask`` alone at positions ``depths`` (masked SDPA over every row)."""
        B = depths.shape[0] if depths.dim() == 2 else mask.shape[0] if mask.dim() == 3 else (
            1 if cache is None else cache.lens.shape[0])
        slots = self._slots(cache, B)
        return {"positions": self.positions(B, depths.shape[-1], cache, depths), "slots": slots, "tree_mask": mask,
                "lengths": None}
