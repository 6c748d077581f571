"""A Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention) with a KV cache that
keeps one length per sequence, so batched decoding of prompts of different lengths and
tree-verified decoding (``leanformer.ops.tree_attention``) work on the same cache."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from leanformer.models.pretrained import load_llama
from leanformer.models.protocol import CausalLM, real_block
from leanformer.nn.packed_linear_layers import _PackedForward, _PackedSwiGLU
from leanformer.nn.quantized_linear import QuantizedLinear
from leanformer.ops import compact_kv_cache, decode_attention, tree_attention
from leanformer.ops.decode_attention import decode_attention_tree

logger = logging.getLogger(__name__)

# leanformer.ops.rms_norm's op without the wrapper's Python frame (leanformer.ops registered its autograd):
# RMSNorm runs 2 * depth + 1 times per decoded token.
_rms_norm = torch.ops.leanformer.rms_norm.default


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


# ---- fused projections and the one-token decoding step ----------------------------------------


def _row_block(tensors: List[Optional[Tensor]]) -> Optional[Tensor]:
    """The tensors stacked along dim 0, as one view of the storage they share, if they lie back
    to back in it (what :meth:`LlamaLM.fuse_projections` arranges); else None."""
    t0 = tensors[0]
    if t0 is None or t0.is_meta:
        return None
    ptr, size, rows = t0.data_ptr(), t0.element_size(), 0
    base = t0.untyped_storage().data_ptr()
    for t in tensors:
        if t is None or not t.is_contiguous() or t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:] \
                or t.data_ptr() != ptr or t.untyped_storage().data_ptr() != base:
            return None
        ptr += t.numel() * size
        rows += t.shape[0]
    return t0.as_strided((rows, *t0.shape[1:]), t0.stride())


def _plain(m: nn.Module) -> bool:
    """No hooks on ``m`` and its own ``forward``."""
    return not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _plain_linear(lin: nn.Module, rows: int) -> bool:
    """Whether ``lin`` computes exactly ``F.linear(x, lin.weight, lin.bias)`` for ``rows`` rows:
    an ``nn.Linear`` without hooks whose forward is its own, or a
    :func:`leanformer.nn.packed_linears` one whose row range leaves ``rows`` to ``F.linear``."""
    if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
        return False
    f = lin.__dict__.get("forward")
    return f is None or (type(f) is _PackedForward and not f.settings.min_rows <= rows <= f.settings.max_rows)


def fused_weight(module: nn.Module, names: tuple, x: Tensor) -> Optional[tuple]:
    """``(weight, bias)`` of the linears ``module.<names>`` run as one (their rows stacked, views
    of one storage, bias None or stacked likewise) where that computes what calling them one by
    one on ``x`` does up to summation order: no gradient needed, each a plain ``nn.Linear``
    (:func:`_plain_linear`), no global module hooks, and weights (and biases) back to back in one
    storage. None otherwise (the caller calls the linears). The views are cached on ``module``,
    keyed by the parameters' addresses."""
    mods, rows = module._modules, x.numel() // x.shape[-1]
    lins = [mods[n] for n in names]
    if _module._global_forward_hooks or _module._global_forward_pre_hooks \
            or not all(_plain_linear(lin, rows) for lin in lins):
        return None
    ws, bs = [lin.weight for lin in lins], [lin.bias for lin in lins]
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)
                                    or any(b is not None and b.requires_grad for b in bs)):
        return None
    key = tuple((w.data_ptr(), w.shape) for w in ws) + tuple(None if b is None else (b.data_ptr(), b.shape) for b in bs)
    cached = module.__dict__.get("_fused_rows")
    if cached is None or cached[0] != key:
        w = _row_block(ws)
        b = None if all(b is None for b in bs) else _row_block(bs)
        fused = None if w is None or (b is None and any(b is not None for b in bs)) else (w, b)
        module.__dict__["_fused_rows"] = cached = (key, fused)
    return cached[1]


_QUANT_BUFFERS = ("qweight", "scales", "mins")


def _plain_quantized(lin: nn.Module) -> bool:
    """A :class:`QuantizedLinear` without hooks whose forward is its own."""
    return type(lin) is QuantizedLinear and not (lin._forward_hooks or lin._forward_pre_hooks
                                                 or "forward" in lin.__dict__)


def fused_quantized(module: nn.Module, names: tuple, x: Tensor):
    """The :class:`QuantizedLinear` layers ``module.<names>`` as one: a function of ``x`` computing
    their outputs side by side with one ``quantized_linear`` over their stacked tiles (which
    computes what each does, bit for bit: rows of the packed weight are independent), where
    their buffers (and biases) are views back to back in one storage (see
    :meth:`LlamaLM.fuse_projections`), no hooks intervene and no gradient is needed. None
    otherwise."""
    mods = module._modules
    lins = [mods[n] for n in names]
    if _module._global_forward_hooks or _module._global_forward_pre_hooks \
            or not all(_plain_quantized(lin) for lin in lins):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(lin.bias is not None and lin.bias.requires_grad
                                                           for lin in lins)):
        return None
    # keyed by the buffer objects (a decoding step asks ~60 times: no data_ptr() or __getattr__ calls)
    key = tuple(lin._buffers["qweight"] for lin in lins)
    cached = module.__dict__.get("_fused_quantized")
    if cached is None or len(cached[0]) != len(key) or any(a is not b for a, b in zip(cached[0], key)):
        cached = (key, None)
        bits, sym = lins[0].bits, lins[0].mins is None
        if all(lin.bits == bits and (lin.mins is None) == sym and lin.out_features % 16 == 0 for lin in lins):
            parts = [_row_block([getattr(lin, b) for lin in lins]) for b in _QUANT_BUFFERS[:2 if sym else 3]]
            biases = [lin.bias for lin in lins]
            bias = None if all(b is None for b in biases) else _row_block(biases)
            if all(p is not None for p in parts) and (bias is not None or all(b is None for b in biases)):
                qweight, scales, mins = parts[0], parts[1], None if sym else parts[2]
                n = sum(lin.out_features for lin in lins)
                op = torch.ops.leanformer.quantized_linear
                cached = (key, lambda x: op(x, qweight, scales, mins, bias, bits, n))
        module.__dict__["_fused_quantized"] = cached
    return cached[1]


def _share_quantized_rows(lins: list) -> None:
    """The buffers (and biases) of the QuantizedLinear layers ``lins`` as views of one storage."""
    if not all(type(lin) is QuantizedLinear and lin.out_features % 16 == 0 for lin in lins) \
            or len({(lin.bits, lin.mins is None, lin.bias is None) for lin in lins}) != 1:
        return
    for attr in _QUANT_BUFFERS + ("bias",):
        ts = [getattr(lin, attr) for lin in lins]
        if ts[0] is None or any(t.is_meta for t in ts) or _row_block(ts) is not None:
            continue
        stacked = torch.cat([t.detach() for t in ts])
        start = 0
        for lin, t in zip(lins, ts):
            part = stacked[start:start + t.shape[0]]
            if attr == "bias":
                part = nn.Parameter(part, requires_grad=t.requires_grad)
            setattr(lin, attr, part)
            start += t.shape[0]


def _share_rows(module: nn.Module, names: tuple) -> None:
    """Makes the weights (and biases) of the linears ``module.<names>`` views of one storage,
    back to back, values unchanged (see :meth:`LlamaLM.fuse_projections`); the same for the
    buffers of :class:`QuantizedLinear` layers."""
    lins = [getattr(module, n) for n in names]
    module.__dict__.pop("_fused_quantized", None)
    _share_quantized_rows(lins)
    if not all(type(lin) is nn.Linear for lin in lins):
        return
    for attr in ("weight", "bias"):
        ps = [getattr(lin, attr) for lin in lins]
        if all(p is None for p in ps) or any(p is None for p in ps) or any(p.is_meta for p in ps) \
                or _row_block(ps) is not None:
            continue
        with torch.no_grad():
            stacked = torch.cat([p.detach() for p in ps])
        start = 0
        for lin, p in zip(lins, ps):
            setattr(lin, attr, nn.Parameter(stacked[start:start + p.shape[0]], requires_grad=p.requires_grad))
            start += p.shape[0]
    module.__dict__.pop("_fused_rows", None)


class DecodeStep:
    """What every layer of a one-token decoding step (``T == 1`` per sequence over a cache, no
    tree) shares, made once per step by :meth:`LlamaLM.call_context`: each sequence's cache
    length ``lens``, the model's RoPE tables ``cos_table``, ``sin_table`` ``[P, D]``
    (:func:`rope_tables`) and the key count ``Lk = max(lens) + 1``. The fused attention
    (``leanformer.ops.decode_attention``) takes those; :meth:`unfused` makes what the unfused
    path needs, once per step (see :meth:`LlamaAttention.step_attention`)."""

    __slots__ = ("lens", "cos_table", "sin_table", "Lk", "L", "_unfused")

    def __init__(self, lens: Tensor, cos_table: Tensor, sin_table: Tensor, Lk: int, L: int):
        self.lens, self.cos_table, self.sin_table, self.Lk, self.L = lens, cos_table, sin_table, Lk, L
        self._unfused = None

    def unfused(self, dtype: torch.dtype, num_heads: int) -> "UnfusedStep":
        """The unfused path's factors (:class:`UnfusedStep`), made on first use in the step."""
        u = self._unfused
        if u is None or u.dtype != dtype or u.num_heads != num_heads:
            u = self._unfused = UnfusedStep(self, dtype, num_heads)
        return u


class UnfusedStep:
    """The unfused step attention's per-step tensors: the RoPE factors at each sequence's
    position (``cos``, ``sin`` with the first half negated: ``x * cos + swap_halves(x) * sin`` is
    rotate-half RoPE), the flat cache row each sequence writes (``b * L_max + lens[b]``), the
    additive key mask (None when every sequence reads all ``Lk`` slots, e.g. batch 1).
    ``threads``: the intra-op thread count to restore around the attention, which runs on one
    thread, or 1 to leave it alone: at decoding sizes (``B * H * Lk * D`` up to
    :data:`SERIAL_ATTENTION_WORK`) the attention is a few dozen microseconds of work, less than
    waking a second OpenMP thread costs, and on a busy host a descheduled worker stalls the step
    by milliseconds (measured: SDPA of 9 heads over 130 keys after a GEMV, 2 threads, load 4 on 2
    cores, median 7 ms; on one thread 54 us)."""

    __slots__ = ("dtype", "num_heads", "cos", "sin", "rows", "Lk", "mask", "threads")

    def __init__(self, step: DecodeStep, dtype: torch.dtype, num_heads: int):
        lens, L, Lk = step.lens, step.L, step.Lk
        B, D = lens.shape[0], step.cos_table.shape[1]
        self.dtype, self.num_heads, self.Lk = dtype, num_heads, Lk
        self.cos, self.sin = step.cos_table[lens][:, None], step.sin_table[lens][:, None]
        self.rows = lens + torch.arange(0, B * L, L, device=lens.device) if B > 1 else lens
        self.mask = None
        if B > 1 and int(lens.min()) + 1 < Lk:  # 0 where slot s <= lens[b], else -inf: one float mask for every layer
            hidden = (torch.arange(Lk, device=lens.device) > lens[:, None]).view(B, 1, 1, Lk)
            self.mask = torch.zeros(hidden.shape, device=lens.device, dtype=dtype).masked_fill_(hidden, float("-inf"))
        threads = torch.get_num_threads()
        serial = _OPENMP and lens.device.type == "cpu" and threads > 1 \
            and B * num_heads * Lk * D <= SERIAL_ATTENTION_WORK
        self.threads = threads if serial else 1


#: Above this many ``B * H * Lk * D`` a decoding step's attention keeps every intra-op thread.
SERIAL_ATTENTION_WORK = 1 << 21
# The thread count is switched only under ATen's OpenMP backend (the default; the native one warns
# when set again after parallel work). It is process-wide for MKL, so another Python thread's GEMM
# running during the attention would run on one thread.
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@dataclass
class TreeStep:
    """What every layer of a token tree's verifying forward over a cache shares (made by
    :meth:`LlamaLM.tree_context`): the tree's ``parents`` ([T] or [B, T]) and the model's RoPE
    tables, for ``leanformer.ops.decode_attention_tree``."""

    parents: Tensor
    cos_table: Tensor
    sin_table: Tensor


def rope_tables(n: int, D: int, base: float, device) -> tuple:
    """``(cos, sin)`` ``[n, D]`` float32 for positions ``0..n-1``: cos of every angle twice
    (both halves), sin with the first half negated, the angles as :func:`rotary_at` makes them
    (so indexing them gives its factors bit for bit)."""
    inv_freq = base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    angles = torch.arange(n, device=device, dtype=torch.long).to(torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32:  # the same arithmetic, one call
            if x.is_cpu and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
                return _rms_norm(x, w, self.eps)  # decoding: one C++ op (ops/rms_norm.py), ~3x faster
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # with autograd, or not on the CPU
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = fused_weight(self, ("gate", "up"), x)
        if gate_up is not None:  # gate and up as one GEMM over their rows (see LlamaLM.fuse_projections)
            g, u = F.linear(x, gate_up[0], gate_up[1]).split(self.gate.out_features, dim=-1)
            return self.down(F.silu(g) * u)
        gate_up = fused_quantized(self, ("gate", "up"), x)
        if gate_up is not None:  # quantized: one quantized_linear over the stacked tiles
            g, u = gate_up(x).split(self.gate.out_features, dim=-1)
            return self.down(F.silu(g) * u)
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
        stacked = fused_quantized(self, ("q_proj", "k_proj", "v_proj"), x)
        if stacked is not None:  # quantized and stacked: one op
            H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            q, k, v = stacked(x).split([H * D, Hkv * D, Hkv * D], -1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        else:
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
                tree_mask: Optional[Tensor] = None, step: Optional[DecodeStep] = None,
                tree: Optional["TreeStep"] = None, lengths: Optional[Tensor] = None) -> Tensor:
        """``lengths``: with a cache, each sequence's real tokens among the T (a prefill of
        right-padded prompts); None: all T."""
        B, T, _ = x.shape
        if step is not None:
            out = self.decode_step(x, k_cache, v_cache, step)
            if out is not None:
                return out
        if tree is not None and tree_mask is not None and k_cache is not None:
            out = self.tree_step(x, k_cache, v_cache, lens, tree)
            if out is not None:
                return out
        q, k, v = self.qkv(x, positions)
        if k_cache is None:  # no prefix: causal, or a dense tree mask (drafter training)
            o = self.attend(q, k, v, tree_mask)
        elif tree_mask is not None:
            o = tree_attention(q, k_cache, v_cache, lens, k, v, tree_mask)
            write_slots(k_cache, v_cache, lens, k, v)
        else:
            write_slots(k_cache, v_cache, lens, k, v)
            o = self.cached_attention(q, k_cache, v_cache, lens, lengths)
        return self.o_proj(o.reshape(B, T, -1))

    def cached_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor,
                         lengths: Optional[Tensor]) -> Tensor:
        """Queries ``q [B, T, H, D]`` at positions ``lens[b] + t`` over the cache (their own K/V
        already written): query t of sequence b reads slots ``0 .. lens[b] + t``. Where the
        sequences differ in cache length or in real tokens (``lengths``), each runs alone over
        exactly its own slots and real queries, as it would in a batch of one: a masked batched
        call sums over a padded key range, whose last bits differ, and quantized layers, which
        round activations to int8, amplify that into other tokens. So a batch's greedy tokens are
        each prompt's own. (Padding queries then get zeros: their outputs are never read.)"""
        B, T = q.shape[:2]
        lens_l = lens.tolist()
        real = [T] * B if lengths is None else lengths.tolist()
        if all(n == T for n in real) and (B == 1 or len(set(lens_l)) == 1):
            Lk = lens_l[0] + T
            slots = torch.arange(Lk, device=q.device)
            # query t of sequence b sees slots 0 .. lens[b] + t (its prefix, then itself causally)
            visible = slots[None, None, :] <= (lens[:, None, None] + torch.arange(T, device=q.device)[None, :, None])
            return self.attend(q, k_cache[:, :Lk], v_cache[:, :Lk], visible)
        o = q.new_zeros(q.shape)
        for b, (start, n) in enumerate(zip(lens_l, real)):
            if n:
                slots = torch.arange(start + n, device=q.device)
                visible = slots[None, None, :] <= (start + torch.arange(n, device=q.device))[None, :, None]
                o[b:b + 1, :n] = self.attend(q[b:b + 1, :n], k_cache[b:b + 1, :start + n], v_cache[b:b + 1, :start + n],
                                             visible)
        return o


    def decode_step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, step: DecodeStep) -> Optional[Tensor]:
        """One new token per sequence (``x [B, 1, C]``) at its cache length, as
        :meth:`step_attention` with q, k and v from one GEMV over the stacked projections
        (:func:`fused_weight`), or, where they cannot run as one (packed by
        :func:`leanformer.nn.packed_linears` for this row count, hooked, or not back to back in
        memory), from calling the three projections as :meth:`qkv` does; then ``o_proj``. The same
        arithmetic as :meth:`forward`'s cached path up to the GEMVs' summation order. None where
        the cache is not contiguous: the caller takes the general path."""
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        fused = fused_weight(self, ("q_proj", "k_proj", "v_proj"), x)
        if fused is None:
            stacked = fused_quantized(self, ("q_proj", "k_proj", "v_proj"), x)
            h = stacked(x) if stacked is not None else torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
            return self.o_proj(self.step_attention(x, k_cache, v_cache, step, projected=h))
        return self.o_proj(self.step_attention(x, k_cache, v_cache, step, *fused))

    def tree_step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, tree: "TreeStep") -> Optional[Tensor]:
        """A token tree's nodes (``x [B, T, C]``) over the cache through
        ``leanformer.ops.decode_attention_tree``: each node's attention the operations a
        one-token step performs, bit for bit (what keeps tree verification exact where
        quantized layers round their activations), its K/V written at ``lens[b] + i`` as
        :func:`tree_attention`'s path writes them; then ``o_proj``. None (the caller takes the
        ``tree_attention`` path) where the op does not apply: the reasons of
        :func:`_unfused_reason`, logged once each."""
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        # Decided on x before projecting (the projections have x's dtype and device), so the
        # caller's fallback does not project twice.
        why = _unfused_reason(x, k_cache, v_cache) or (
            None if _has_kernel("decode_attention_tree", x.device.type)
            else f"no decode_attention_tree kernel on {x.device.type}") or (
            "gradients needed" if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            else None)
        if why is not None:
            if why not in _LOGGED_UNFUSED:
                _LOGGED_UNFUSED.add(why)
                logger.info("LlamaAttention tree step: tree_attention path (%s)", why)
            return None
        stacked = fused_quantized(self, ("q_proj", "k_proj", "v_proj"), x)
        if stacked is not None:
            h = stacked(x)
        else:
            fused = fused_weight(self, ("q_proj", "k_proj", "v_proj"), x)
            h = F.linear(x, *fused) if fused is not None else torch.cat([self.q_proj(x), self.k_proj(x),
                                                                          self.v_proj(x)], -1)
        o = decode_attention_tree(h, k_cache, v_cache, lens, tree.cos_table, tree.sin_table, self.num_heads,
                                  tree.parents)
        return self.o_proj(o)

    def step_attention(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, step: DecodeStep,
                       weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       projected: Optional[Tensor] = None) -> Tensor:
        """The attention of one new token per sequence before ``o_proj``: ``x [B, 1, C]`` through
        the stacked q/k/v ``weight`` (and ``bias``), or their output ``projected [B, 1, (H + 2
        Hkv) D]`` computed by the caller, then ``leanformer.ops.decode_attention`` (q and
        k rotated with the step's RoPE tables, k and v written into the contiguous cache at row
        ``lens[b]``, attention over slots ``0..lens[b]``) -> ``[B, 1, H * D]``. Where the op does
        not apply (:func:`_unfused_reason`: another dtype or device, a cache in another dtype,
        gradients needed) the same steps in PyTorch ops, logged once per reason."""
        B, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        h = F.linear(x, weight, bias) if projected is None else projected
        why = _unfused_reason(h, k_cache, v_cache)
        if why is None:
            o = decode_attention(h.view(B, -1), k_cache, v_cache, step.lens, step.cos_table, step.sin_table, H)
            return o.view(B, 1, H * D)
        if why not in _LOGGED_UNFUSED:  # once per reason, not once per step
            _LOGGED_UNFUSED.add(why)
            logger.info("LlamaAttention decode step: unfused attention (%s)", why)
        u = step.unfused(x.dtype, H)
        h = h.view(B, H + 2 * Hkv, D)
        qk, v, half, float32 = h[:, :H + Hkv], h[:, H + Hkv:], D // 2, x.dtype == torch.float32
        qk = qk if float32 else qk.float()  # RoPE in float32, as rotary_at
        qk = qk * u.cos + torch.cat([qk[..., half:], qk[..., :half]], -1) * u.sin
        qk = qk if float32 else qk.to(x.dtype)
        q, k = qk[:, :H], qk[:, H:]
        if k_cache.dtype != x.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.view(-1, Hkv, D).index_copy_(0, u.rows, k)
        v_cache.view(-1, Hkv, D).index_copy_(0, u.rows, v)
        Lk, threads = u.Lk, u.threads
        if threads > 1:  # see UnfusedStep: a small attention runs on one thread
            torch.set_num_threads(1)
        try:
            o = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache[:, :Lk].transpose(1, 2),
                                               v_cache[:, :Lk].transpose(1, 2), attn_mask=u.mask, enable_gqa=True)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return o.reshape(B, 1, H * D)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOGGED_UNFUSED: set = set()


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"leanformer::{op}", key)


def _has_decode_kernel(device_type: str) -> bool:
    return _has_kernel("decode_attention", device_type)


def _unfused_reason(qkv: Tensor, k_cache: Tensor, v_cache: Tensor) -> Optional[str]:
    """Why a decoding step's attention cannot run as ``leanformer.ops.decode_attention`` (None: it
    can): the op takes float32 / bfloat16 / float16 on the CPU and CUDA (when built with CUDA
    kernels), the caches in the activations' dtype, and has no autograd."""
    if qkv.dtype not in _FUSED_DTYPES:
        return f"{qkv.dtype} activations"
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        return f"a {k_cache.dtype} cache for {qkv.dtype} activations"
    if not _has_decode_kernel(qkv.device.type):
        return f"no decode_attention kernel on {qkv.device.type}"
    if qkv.requires_grad:
        return "gradients needed"
    return None


def write_slots(k_cache: Tensor, v_cache: Tensor, lens: Tensor, k: Tensor, v: Tensor) -> None:
    """``k_cache[b, lens[b] + t] = k[b, t]`` (and v) for every sequence b and token t."""
    B, T = k.shape[:2]
    start, end = int(lens.min()), int(lens.max())
    if end + T > k_cache.shape[1]:
        raise ValueError(f"the KV cache holds {k_cache.shape[1]} positions; {end} cached + {T} new do "
                         "not fit (make it with a larger max_len)")
    if start == end:  # every sequence at one length (one prompt, a step): slices, no index_put
        # (index_put opens an OpenMP region, ~8 ms whenever another process holds a core)
        k_cache[:, start:start + T] = k
        v_cache[:, start:start + T] = v
        return
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

    def forward(self, x: Tensor, positions: Tensor, k_cache=None, v_cache=None, lens=None, tree_mask=None,
                step: Optional[DecodeStep] = None, tree: Optional[TreeStep] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        if step is not None:
            out = self.decode_step(x, k_cache, v_cache, step)
            if out is not None:
                return out
        if self.attn is not None:  # None: dropped by leanformer.layers.drop_modules
            if step is not None:  # a one-token decoding step (LlamaLM.call_context)
                x = x + self.attn(self.attn_norm(x), positions, k_cache, v_cache, lens, tree_mask, step=step)
            elif tree is not None:  # a token tree's verification (LlamaLM.tree_context)
                x = x + self.attn(self.attn_norm(x), positions, k_cache, v_cache, lens, tree_mask, tree=tree)
            else:
                x = x + self.attn(self.attn_norm(x), positions, k_cache, v_cache, lens, tree_mask, lengths=lengths)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def decode_step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, step: DecodeStep) -> Optional[Tensor]:
        """The block on one new token per sequence without a module call per sub-layer: norms,
        the stacked q/k/v GEMV, :meth:`LlamaAttention.step_attention`, ``o_proj``, the stacked
        gate/up GEMV and ``down``, each computing what the module would (nn.Linear layers, or
        :class:`QuantizedLinear` ones with stacked tiles). None (the caller runs the modules)
        unless every sub-module is the plain kind (no hooks, no replaced forward, no packed kernel
        for these rows, the projections fused) and the cache contiguous."""
        m = self._modules
        n1, attn, n2, mlp = m["attn_norm"], m["attn"], m["mlp_norm"], m["mlp"]
        if type(n1) is not RMSNorm or type(n2) is not RMSNorm or type(attn) is not LlamaAttention \
                or type(mlp) is not SwiGLU or not (_plain(n1) and _plain(n2) and _plain(attn)) \
                or mlp._forward_hooks or mlp._forward_pre_hooks:
            return None
        rows = x.shape[0]
        f = mlp.__dict__.get("forward")
        if f is not None and not (type(f) is _PackedSwiGLU and not f.settings.min_rows <= rows <= f.settings.max_rows):
            return None
        o, down = attn._modules["o_proj"], mlp._modules["down"]
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        if _plain_quantized(o) and _plain_quantized(down) and f is None:  # quantized layers, stacked
            qkv = fused_quantized(attn, ("q_proj", "k_proj", "v_proj"), x)
            gate_up = fused_quantized(mlp, ("gate", "up"), x) if qkv is not None else None
            if gate_up is None:
                return None
            h = attn.step_attention(x, k_cache, v_cache, step, projected=qkv(RMSNorm.forward(n1, x)))
            x = x + QuantizedLinear.forward(o, h)
            g, u = gate_up(RMSNorm.forward(n2, x)).split(mlp._modules["gate"].out_features, dim=-1)
            return x + QuantizedLinear.forward(down, F.silu(g) * u)
        if not (_plain_linear(o, rows) and _plain_linear(down, rows)):
            return None
        qkv = fused_weight(attn, ("q_proj", "k_proj", "v_proj"), x)
        gate_up = fused_weight(mlp, ("gate", "up"), x) if qkv is not None else None
        if gate_up is None:
            return None
        x = x + F.linear(attn.step_attention(RMSNorm.forward(n1, x), k_cache, v_cache, step, *qkv), o.weight, o.bias)
        g, u = F.linear(RMSNorm.forward(n2, x), *gate_up).split(mlp._modules["gate"].out_features, dim=-1)
        return x + F.linear(F.silu(g) * u, down.weight, down.bias)


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
    #: one-token decoding steps take the :class:`DecodeStep` path (False: the general path, for
    #: comparisons; same tokens)
    fast_decode_step: bool = True
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
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, quantized: bool = False) -> "LlamaLM":
        """A pretrained Llama-family model (eval mode, on the CPU, in ``dtype``) from a Hugging
        Face folder (``config.json`` and ``*.safetensors``, sharded or not: Llama, SmolLM,
        Mistral without a sliding window, Qwen2) or a ``.gguf`` file (architecture ``llama``;
        F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors, dequantized). The model is built on the
        meta device and takes the checkpoint's tensors, so nothing is initialized twice. A
        config this model cannot represent (rope scaling, a sliding window, experts, another
        architecture, biases other than q/k/v, another activation) raises ValueError naming
        the field; a missing or mis-shaped tensor raises ValueError naming the tensor. Needs
        the optional dependencies: ``pip install "leanformer[hf]"``.

        ``quantized=True`` (GGUF only) keeps the Q8_0 / Q4_0 / Q4_1 weights of the Linear layers
        as they are, in :class:`leanformer.nn.QuantizedLinear` layers (a tied ``lm_head`` reads
        the embedding's blocks; the embedding table itself is dequantized for lookups); other
        Linear tensors stay dense, logged.

        Example::

            model = LlamaLM.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
            tokenizer = leanformer.models.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
        """
        return load_llama(path, cls, LlamaConfig, dtype=dtype, quantized=quantized).fuse_projections()

    def fuse_projections(self) -> "LlamaLM":
        """Lays each block's query, key and value weights (and biases), and its MLP's gate and up
        weights, back to back in one storage, so that a decoding step runs each group as one
        GEMV (:func:`fused_weight`). The parameters keep their names, shapes and values (the
        state_dict is unchanged; they are views of the shared storage, which
        ``save_pretrained`` writes as separate tensors); anything that replaces them
        (``model.to(dtype)``, ``load_state_dict(assign=True)``) undoes it, and the model then
        runs them one by one again. :meth:`from_pretrained` calls it. Returns the model."""
        for block in self.layers:
            block = real_block(block)
            if block.attn is not None:
                _share_rows(block.attn, ("q_proj", "k_proj", "v_proj"))
            if block.mlp is not None and isinstance(block.mlp, SwiGLU):
                _share_rows(block.mlp, ("gate", "up"))
        return self

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
        self._check_call(input_ids, cache, lengths, tree_mask, depths)
        if (exit_layer is not None or output_hidden_states) and (tree_mask is not None or lengths is not None
                                                                 or return_hidden):
            raise ValueError("exit_layer/output_hidden_states take neither a token tree, lengths nor return_hidden")
        return self.stack_forward(input_ids, cache=cache, exit_layer=exit_layer,
                                  output_hidden_states=output_hidden_states, return_hidden=return_hidden,
                                  lengths=lengths, tree_mask=tree_mask, depths=depths)

    @staticmethod
    def _check_call(input_ids: Tensor, cache: Optional[KVCache], lengths: Optional[Tensor],
                    tree_mask: Optional[Tensor], depths: Optional[Tensor]) -> None:
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

    # ---- the layer-stack protocol (leanformer.models.LayerStack / CausalLM) ----

    def stack_blocks(self) -> nn.ModuleList:
        return self.layers

    def call_context(self, input_ids: Tensor, cache: Optional[KVCache] = None, lengths: Optional[Tensor] = None,
                     tree_mask: Optional[Tensor] = None, depths: Optional[Tensor] = None) -> dict:
        B, T = input_ids.shape
        slots = self._slots(cache, B)  # checks the cache first
        one_token = T == 1 and cache is not None and tree_mask is None and lengths is None
        step = self._decode_step(cache) if one_token and self.fast_decode_step else None
        return {"positions": self.positions(B, T, cache, depths), "slots": slots, "tree_mask": tree_mask,
                "lengths": lengths, "step": step}

    def _decode_step(self, cache: KVCache) -> DecodeStep:
        """The :class:`DecodeStep` of one new token per sequence over ``cache``."""
        lens, L = cache.lens, cache.max_len
        Lk = int(lens.max()) + 1
        if Lk > L:
            raise ValueError(f"the KV cache holds {L} positions; {Lk - 1} cached + 1 new do not fit (make it with "
                             "a larger max_len)")
        tables = self.rope_tables_for(L, lens.device)
        return DecodeStep(lens, tables[0], tables[1], Lk, L)

    def rope_tables_for(self, L: int, device) -> tuple:
        """The RoPE tables of positions up to ``max(L, max_seq_len)``, kept on the model."""
        c = self.config
        tables = self.__dict__.get("_rope_tables")
        if tables is None or tables[0].shape[0] < L or tables[0].device != device:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode too
                tables = rope_tables(max(L, c.max_seq_len), c.head_dim, c.rope_base, device)
            self.__dict__["_rope_tables"] = tables
        return tables

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
        step = ctx.get("step")
        if step is not None:
            return self.layers[i](x, ctx["positions"], cache.k[s], cache.v[s], cache.lens, None, step=step)
        tree = ctx.get("tree")
        if type(self.layers[i]) is LlamaBlock:
            if tree is not None:
                return self.layers[i](x, ctx["positions"], cache.k[s], cache.v[s], cache.lens, ctx["tree_mask"],
                                      tree=tree)
            return self.layers[i](x, ctx["positions"], cache.k[s], cache.v[s], cache.lens, ctx["tree_mask"],
                                  lengths=ctx["lengths"])
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
        """As :meth:`~leanformer.models.CausalLM.prefill`: the blocks only (the cache is what a
        prefill makes; :meth:`~leanformer.models.LayerStack.stack_fill`)."""
        if input_ids.shape[1]:
            self._check_call(input_ids, cache, lengths, None, None)
            self.stack_fill(input_ids, cache=cache, lengths=lengths)

    def tree_context(self, cache: Optional[KVCache], mask: Tensor, depths: Tensor, parents: Tensor) -> dict:
        """As :meth:`~leanformer.models.CausalLM.tree_context`; ``cache`` None runs the nodes
        under the dense ``mask`` alone at positions ``depths`` (masked SDPA over every row)."""
        B = depths.shape[0] if depths.dim() == 2 else mask.shape[0] if mask.dim() == 3 else (
            1 if cache is None else cache.lens.shape[0])
        slots = self._slots(cache, B)
        tree = None
        if cache is not None and self.fast_decode_step:
            cos, sin = self.rope_tables_for(cache.max_len, cache.lens.device)
            tree = TreeStep(parents.to(cache.lens.device), cos, sin)
        return {"positions": self.positions(B, depths.shape[-1], cache, depths), "slots": slots, "tree_mask": mask,
                "lengths": None, "tree": tree}
