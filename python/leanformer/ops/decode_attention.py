"""The decode_attention family: one decoding step's attention of a layer in one op.

Kernels: ``torch.ops.leanformer.decode_attention``, C++ on CPU (csrc/decode_attention_cpu.cpp)
and CUDA (csrc/cuda/decode_attention_cuda.cu); its fake kernel for torch.compile and export is
the C++ Meta kernel of csrc/decode_attention_meta.cpp, which runs the same argument checks (all
but the values of lens, which need the data: the real kernels refuse a length with no room left
in the cache or no row in the RoPE tables; device-side asserts on CUDA). Reference:
:mod:`leanformer.reference.decode_attention`.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.leanformer


def decode_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, cos: Tensor, sin: Tensor,
                     num_heads: int) -> Tensor:
    """Attention of one new token per sequence over a KV cache: RoPE, the cache write and the
    attention in one call (an inference op: no autograd; the caches are written in place).

    Per sequence b, with ``p = lens[b]`` (the tokens already cached): the new token's query heads
    and key heads are rotated with rotate-half RoPE at position p (``x * cos[p] +
    swap_halves(x) * sin[p]`` in fp32, rounded to qkv's dtype), the key and value are written to
    ``k_cache[b, p]`` and ``v_cache[b, p]`` (``lens`` itself is not advanced), and query head h
    attends over slots ``0..p`` of key/value head ``h // (H // Hkv)`` (grouped-query): softmax of
    the scores scaled by ``D ** -0.5``, in fp32. The same arithmetic as the unfused steps up to
    the order of float sums. Sequences of different lengths need no mask.

    Args:
        qkv: ``[B, (H + 2 * Hkv) * D]``, the new token's q, k and v side by side (the output of
            one linear over the stacked q/k/v projections, viewed as 2-D; any strides);
            float32, bfloat16 or float16.
        k_cache, v_cache: ``[B, L, Hkv, D]`` contiguous, in qkv's dtype; written at row ``lens[b]``.
        lens: int64 ``[B]``, each in ``[0, L - 1]``.
        cos, sin: float32 ``[P, D]`` RoPE tables with ``P > lens[b]``: cos of each angle in both
            halves, sin with the first half negated (``leanformer.models.llama.rope_tables``).
        num_heads: H, a multiple of Hkv; D must be even.

    Returns:
        ``[B, H * D]`` in qkv's dtype (the heads side by side, ready for ``o_proj``).

    Example::

        >>> cos, sin = rope_tables(2048, 64, 10000.0, "cpu")
        >>> k_cache = torch.zeros(1, 2048, 3, 64); v_cache = torch.zeros_like(k_cache)
        >>> qkv = torch.randn(1, (9 + 2 * 3) * 64)
        >>> o = decode_attention(qkv, k_cache, v_cache, torch.tensor([0]), cos, sin, 9)  # [1, 576]
    """
    return _ops.decode_attention(qkv, k_cache, v_cache, lens, cos, sin, num_heads)


def decode_attention_tree(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, lens: Tensor, cos: Tensor, sin: Tensor,
                          num_heads: int, parents: Tensor) -> Tensor:
    """:func:`decode_attention` for a token tree of T nodes per sequence (verifying drafts), CPU.

    Args:
        qkv: ``[B, T, (H + 2 Hkv) * D]``, the tree nodes' projections (node 0 the root).
        k_cache, v_cache, lens, cos, sin, num_heads: as :func:`decode_attention`.
        parents: int64 ``[T]`` (one tree for the batch) or ``[B, T]``, ``parents[0] = -1``,
            ``parents[i] < i``.

    Returns:
        ``[B, T, H * D]``. Node i is the token at position ``lens[b] + depth(i)``; its rotated key
        and value are written at cache row ``lens[b] + i`` (``lens`` unchanged: after the
        verification, :func:`compact_kv_cache` keeps the accepted rows). It attends rows
        ``0..lens[b]-1``, then its ancestors' rows and its own, root first, with the operations
        :func:`decode_attention` performs for that token when its ancestors sit at rows
        ``lens[b], lens[b] + 1, ...``: the result is **bit for bit** what plain decoding of the
        accepted tokens computes, so greedy verification accepts exactly plain greedy decoding's
        tokens even where a model rounds its activations (quantized layers) and amplifies the last
        bits in which :func:`tree_attention` (a faster merge of the prefix and the tree) differs.

    Example::

        >>> parents = torch.tensor([-1, 0, 0, 1])          # root, two children, a grandchild
        >>> o = decode_attention_tree(qkv, k_cache, v_cache, lens, cos, sin, 9, parents)  # [B, 4, 9 * 64]
    """
    return _ops.decode_attention_tree(qkv, k_cache, v_cache, lens, cos, sin, num_heads, parents)
