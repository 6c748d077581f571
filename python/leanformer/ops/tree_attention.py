"""The tree_attention family: attention of a token tree's nodes over a cached prefix, the
verifying forward of tree-verified decoding (Medusa, Hidden Transfer, EAGLE).

A draft is a token tree of T nodes: node 0 is the root (the last verified token, whose K/V
is not in the cache yet), ``parents [T]`` (or ``[B, T]``) with ``parents[0] = -1`` and
``parents[i] < i``, and ``tree_mask bool [T, T]`` (or ``[B, T, T]``) with ``[i, j]`` true iff
j is i or an ancestor of i. The position id of node i is ``cache_lens[b] + depth[i]``.
Tree token padding is -1, never a real id.

Kernels: ``torch.ops.leanformer.tree_attention`` (softmax attention over a KV cache) and
``tree_linear_attention`` (SLAB's linear attention over a recurrent prefix state), C++ on CPU
(csrc/tree_attention*_cpu.cpp) and CUDA (csrc/cuda/tree_attention_cuda.cu); their fake
kernels for torch.compile and export are the C++ Meta kernels of csrc/tree_attention_meta.cpp,
which run the same argument checks (all but cache_lens' values and the mask's diagonal, which
need the data). Both are differentiable: the backward recomputes through the PyTorch reference
(:mod:`leanformer.reference.tree_attention`), which is what training a drafter through a tree
needs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanformer.ops._grads import grads_through
from leanformer.reference.tree_attention import tree_attention_reference, tree_linear_attention_reference

_ops = torch.ops.leanformer


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k_tree: Tensor,
                   v_tree: Tensor, tree_mask: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """Softmax attention of a token tree's queries over each sequence's KV cache and the tree.

    Every node attends to the first ``cache_lens[b]`` cache slots (unmasked) and to its
    ancestors and itself in the tree; the prefix and tree parts are computed separately and
    merged by log-sum-exp, so no ``[T, L + T]`` mask is ever built.

    Args:
        q: ``[B, T, Hq, D]`` the tree nodes' queries (RoPE applied).
        k_cache, v_cache: ``[B, L_max, Hkv, D]`` / ``[B, L_max, Hkv, Dv]``; ``Hq % Hkv == 0``
            (GQA: query head h reads KV head ``h // (Hq // Hkv)``).
        cache_lens: int64 ``[B]`` in ``[0, L_max]``, the valid prefix of each sequence.
        k_tree, v_tree: ``[B, T, Hkv, D]`` / ``[B, T, Hkv, Dv]`` the tree nodes' keys and values.
        tree_mask: bool ``[T, T]`` (one tree for the batch) or ``[B, T, T]``; the diagonal
            must be true.
        scale: defaults to ``D ** -0.5``.

    float32, bfloat16, float16 or float64 (all tensors alike); fp32 accumulation. Any strides
    with a contiguous last dim are read in place (an fp32 cache is not even converted); a tensor
    whose last dim is strided is copied on every call.

    Returns:
        ``o [B, T, Hq, Dv]`` in q's dtype. Differentiable in q, the caches and the tree's K/V:
        the backward recomputes through the dense reference (``[T, L + T]`` scores), meant for
        training drafters on short sequences, not for long prefixes.

    Example::

        >>> B, L, T, Hq, Hkv, D = 2, 100, 5, 8, 2, 64
        >>> k_cache, v_cache = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
        >>> parents = torch.tensor([-1, 0, 0, 1, 1])
        >>> mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
        ...                      [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
        >>> o = tree_attention(torch.randn(B, T, Hq, D), k_cache, v_cache, torch.tensor([90, 0]),
        ...                    torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D), mask)
        >>> o.shape
        torch.Size([2, 5, 8, 64])
    """
    return _ops.tree_attention(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask, scale)


def tree_linear_attention(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, tree_mask: Tensor,
                          *, eps: float = 1e-6) -> Tensor:
    """Simplified (ReLU) linear attention of a token tree on top of a recurrent prefix state.

    ``o_i = phi(q_i) (S + sum_j phi(k_j)^T v_j) / (phi(q_i) . (z + sum_j phi(k_j)) + eps)``,
    phi = ReLU, the sums over node i's ancestors and itself: each node sees the prefix state
    plus its own branch, the tree counterpart of a causal decode step.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``, the tree nodes.
        S: ``[B, H, Dk, Dv]``, z: ``[B, H, Dk]``: the prefix state (as returned by
            ``simplified_linear_attention(..., causal=True, output_final_state=True)``),
            float32 (float64 for float64 inputs).
        tree_mask: bool ``[T, T]`` or ``[B, T, T]``.
        eps: added to the denominator.

    Returns:
        ``o [B, T, H, Dv]`` in q's dtype. Differentiable in q, k, v, S and z: the backward
        recomputes through the dense reference (``[T, T]`` scores per head), which is how
        Hidden Transfer trains through a SLAB LM's layers.

    Example::

        >>> q, k, v = (torch.randn(1, 3, 4, 32) for _ in range(3))
        >>> S, z = torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 32)
        >>> mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        >>> tree_linear_attention(q, k, v, S, z, mask).shape
        torch.Size([1, 3, 4, 32])
    """
    return _ops.tree_linear_attention(q, k, v, S, z, tree_mask, eps)


# ---- autograd: the forward is the fused kernel; the backward recomputes the attention through
# the dense PyTorch reference (O(T (L + T)) memory), which is what training a drafter through
# the tree ops needs (short sequences); decoding never runs it ----

def _tree_attention_setup(ctx, inputs, output):
    q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask)
    ctx.scale = scale


def _tree_attention_backward(ctx, grad_o):
    q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask = ctx.saved_tensors
    n = ctx.needs_input_grad

    def ref(q_, kc, vc, kt, vt):
        return tree_attention_reference(q_, kc, vc, cache_lens, kt, vt, tree_mask, ctx.scale)

    gq, gkc, gvc, gkt, gvt = grads_through(ref, [q, k_cache, v_cache, k_tree, v_tree],
                                            [n[0], n[1], n[2], n[4], n[5]], grad_o)
    return gq, gkc, gvc, None, gkt, gvt, None, None


def _tree_linear_attention_setup(ctx, inputs, output):
    q, k, v, S, z, tree_mask, eps = inputs
    ctx.save_for_backward(q, k, v, S, z, tree_mask)
    ctx.eps = eps


def _tree_linear_attention_backward(ctx, grad_o):
    q, k, v, S, z, tree_mask = ctx.saved_tensors
    n = ctx.needs_input_grad

    def ref(q_, k_, v_, S_, z_):
        return tree_linear_attention_reference(q_, k_, v_, S_, z_, tree_mask, ctx.eps)

    return (*grads_through(ref, [q, k, v, S, z], n[:5], grad_o), None, None)


torch.library.register_autograd("leanformer::tree_attention", _tree_attention_backward,
                                setup_context=_tree_attention_setup)
torch.library.register_autograd("leanformer::tree_linear_attention", _tree_linear_attention_backward,
                                setup_context=_tree_linear_attention_setup)
