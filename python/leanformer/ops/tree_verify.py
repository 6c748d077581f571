"""The tree_verify family: which drafted tokens of a token tree the target model accepts, and
the KV cache kept after it.

A draft is a token tree of T nodes: node 0 is the root (the last verified token, whose K/V
is not in the cache yet), ``parents [T]`` (or ``[B, T]``) with ``parents[0] = -1`` and
``parents[i] < i``, and ``tree_mask bool [T, T]`` (or ``[B, T, T]``) with ``[i, j]`` true iff
j is i or an ancestor of i. The position id of node i is ``cache_lens[b] + depth[i]``.
Tree token padding is -1, never a real id.

Kernels: ``torch.ops.leanformer.verify_tree_greedy``, ``verify_tree_sampling`` and
``compact_kv_cache``, C++ on CPU (csrc/tree_verify*_cpu.cpp) and CUDA
(csrc/cuda/tree_verify_cuda.cu); their fake kernels for torch.compile and export are the C++
Meta kernels of csrc/tree_verify_meta.cpp, which run the same argument checks (all but the
values: parents forming a tree, token ids within the vocabulary, accepted paths ascending,
cache_lens within the cache). Not differentiable. Sampling verification takes the warped
distribution (:func:`leanformer.decoding.warp_probs`), the same warp plain sampling uses, so
the two sample the same distribution.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.leanformer

Verification = Tuple[Tensor, Tensor, Tensor]


def verify_tree_greedy(logits: Tensor, tree_tokens: Tensor, parents: Tensor) -> Verification:
    """Greedy verification: the longest tree path that plain greedy decoding would produce.

    From the root, move to the first child whose token is the argmax of the current node's
    logits (ties: the lowest token id); stop when there is none and emit that argmax as the
    bonus token.

    Args:
        logits: ``[B, T, V]`` the target model's logits at the tree nodes.
        tree_tokens: int64 ``[B, T]``, node 0 the root's token, -1 for padding.
        parents: int64 ``[T]`` or ``[B, T]``, ``parents[0] = -1``, ``parents[i] < i``.

    Returns:
        ``(accepted [B, T], num_accepted [B], bonus [B])`` int64: the node indices of the
        accepted path (``accepted[:, 0] = 0``, padded with -1), its length (>= 1, root
        included) and the next token after its last node.

    Example::

        >>> logits = torch.zeros(1, 3, 10); logits[0, 0, 7] = logits[0, 2, 4] = 1
        >>> verify_tree_greedy(logits, torch.tensor([[5, 3, 7]]), torch.tensor([-1, 0, 0]))
        (tensor([[ 0,  2, -1]]), tensor([2]), tensor([4]))
    """
    return _ops.verify_tree_greedy(logits, tree_tokens, parents)


def verify_tree_sampling(probs: Tensor, tree_tokens: Tensor, parents: Tensor, *,
                         generator: Optional[torch.Generator] = None) -> Verification:
    """Lossless sampling verification of a tree of deterministic drafts (the EAGLE rule).

    At the current node with target distribution p (its row of ``probs``), try its children in
    order, accepting child x with probability p(x); on rejection set p(x) = 0 and renormalize;
    if every child is rejected (or there is none), the bonus token is drawn from the residual
    p. The tokens produced are distributed exactly as plain sampling from ``probs``. Children
    with token -1 are skipped.

    Args:
        probs: ``[B, T, V]`` the target's sampling distribution at the tree nodes, already
            warped (temperature, top-k, top-p) as plain sampling warps it:
            :func:`leanformer.decoding.warp_probs` of the logits.
        tree_tokens, parents: as in :func:`verify_tree_greedy`.
        generator: draws the ``[B, T]`` uniforms the kernel consumes in a fixed order.

    Returns:
        ``(accepted [B, T], num_accepted [B], bonus [B])`` as :func:`verify_tree_greedy`.

    Example::

        >>> from leanformer.decoding import warp_probs
        >>> g = torch.Generator().manual_seed(0)
        >>> probs = warp_probs(torch.randn(2, 3, 10), top_k=4)
        >>> acc, n, bonus = verify_tree_sampling(probs, torch.tensor([[5, 3, 7]] * 2),
        ...                                      torch.tensor([-1, 0, 0]), generator=g)
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [B, T, V], got shape {tuple(probs.shape)}")
    B, T = probs.shape[:2]
    gen_device = generator.device if generator is not None else probs.device
    uniforms = torch.rand((B, T), generator=generator, device=gen_device).to(probs.device)
    return _ops.verify_tree_sampling(probs, tree_tokens, parents, uniforms)


def compact_kv_cache(k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, accepted: Tensor,
                     num_accepted: Tensor) -> None:
    """Keep the accepted tree nodes' K/V, in place, per sequence.

    The tree's K/V were written at cache slots ``cache_lens[b] + i`` (i < T); slot
    ``L + accepted[b, j]`` moves to ``L + j`` for ``j < num_accepted[b]`` and
    ``cache_lens[b] += num_accepted[b]``. The cache then holds what plain decoding of the
    accepted tokens would have built (their RoPE positions are already right).

    Args:
        k_cache, v_cache: ``[B, L_max, Hkv, D]`` / ``[B, L_max, Hkv, Dv]``, modified in place.
        cache_lens: int64 ``[B]``, modified in place.
        accepted, num_accepted: int64 ``[B, T]`` / ``[B]`` from a verification.

    Example::

        >>> acc, n, bonus = verify_tree_greedy(logits, tree_tokens, parents)
        >>> compact_kv_cache(k_cache, v_cache, cache_lens, acc, n)
    """
    _ops.compact_kv_cache(k_cache, v_cache, cache_lens, accepted, num_accepted)
