"""The tree_state family: a SLAB LM's recurrent state carried through a token tree.

A draft is a token tree of T nodes: node 0 is the root (the last verified token, whose K/V
is not in the cache yet), ``parents [T]`` (or ``[B, T]``) with ``parents[0] = -1`` and
``parents[i] < i``, and ``tree_mask bool [T, T]`` (or ``[B, T, T]``) with ``[i, j]`` true iff
j is i or an ancestor of i. The position id of node i is ``cache_lens[b] + depth[i]``.
Tree token padding is -1, never a real id.

Kernels: ``torch.ops.leanformer.sla_tree_commit`` (the accepted path folded into every
layer's state, in place) and ``tree_dwconv`` (SLAB's causal depthwise conv of V along each
node's branch), C++ on CPU (csrc/tree_state_*_cpu.cpp) and CUDA (csrc/cuda/tree_state_*_cuda.cu);
their fake kernels for torch.compile and export are the C++ Meta kernels of
csrc/tree_state_meta.cpp, which run the same argument checks (all but the values of parents
and path, which need the data: a tree that is not one is refused by the real kernel).
``tree_dwconv`` is differentiable through the PyTorch reference
(:mod:`leanformer.reference.tree_state`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from leanformer.ops._grads import grads_through
from leanformer.reference.tree_state import tree_dwconv_reference

_ops = torch.ops.leanformer


def sla_tree_commit(S: List[Tensor], z: List[Tensor], conv_tail: List[Tensor], k: List[Tensor], v: List[Tensor],
                    path: Tensor, num_accepted: Tensor) -> None:
    """Fold a verified tree's accepted path into a SLAB LM's recurrent state, every layer at once, in place.

    Per layer l and sequence b, over the path's first ``num_accepted[b]`` nodes
    ``i = path[b, j]`` in order: ``S[l][b] += relu(k[l][b, i])^T v[l][b, i]`` (per head),
    ``z[l][b] += relu(k[l][b, i])``, and ``conv_tail[l]`` becomes the last W values of
    "old tail ++ the path's V", oldest first: the state plain decoding of those tokens leaves.

    Args:
        S: per layer ``[B, H, Dk, Dv]`` float32/float64 (the state; last dim contiguous).
        z: per layer ``[B, H, Dk]`` in S's dtype.
        conv_tail: per layer ``[B*H, Dv, W]`` (the causal conv's last W values of V), or ``[]``.
        k, v: per layer the tree's ``[B, T, H, Dk]`` / ``[B, T, H, Dv]`` (any strides, one dtype).
        path: int64 ``[B, n]``, the accepted nodes root first (``verify_tree_greedy``'s
            ``accepted``); num_accepted: int64 ``[B]``, at most n.

    Example::

        >>> acc, n, bonus = verify_tree_greedy(logits, tree_tokens, parents)
        >>> sla_tree_commit(S, z, tails, ks, vs, acc, n)
    """
    _ops.sla_tree_commit(S, z, conv_tail, k, v, path, num_accepted)


def tree_dwconv(v: Tensor, conv_tail: Tensor, parents: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """SLAB's causal depthwise convolution of V for every node of a token tree.

    Node t of sequence b sees the values along its own branch: itself, its parent, ... up to
    the root, then the prefix's last values (``conv_tail``, newest last), as plain decoding of
    that branch would: ``out[b, t, h, d] = bias[d] + sum_l weight[d, W - l] * x_l`` with
    ``x_l`` the value l steps up t's chain (``W = kernel_size - 1``).

    Args:
        v: ``[B, T, H, D]`` the tree's values (any strides; float32/float64/bfloat16/float16).
        conv_tail: ``[B*H, D, W]`` in v's dtype, oldest first (``SLACache.conv_tail``).
        parents: int64 ``[T]`` or ``[B, T]``, ``parents[0] = -1``, ``-1 <= parents[i] < i``.
        weight: ``[D, W + 1]`` in v's dtype (a depthwise ``nn.Conv1d``'s ``weight[:, 0]``,
            shared by the heads); bias: ``[D]`` or None.

    Returns:
        ``[B, T, H, D]`` in v's dtype.

    Example::

        >>> o = o + tree_dwconv(v, cache.conv_tail, tree.parents, attn.dwc.weight[:, 0], attn.dwc.bias)
    """
    return _ops.tree_dwconv(v, conv_tail, parents, weight, bias)


# ---- autograd: through the PyTorch reference (for training drafters through a SLAB LM) ----

def _tree_dwconv_setup(ctx, inputs, output):
    v, conv_tail, parents, weight, bias = inputs
    ctx.save_for_backward(v, conv_tail, parents, weight, bias)
    ctx.has_bias = bias is not None


def _tree_dwconv_backward(ctx, grad_o):
    v, conv_tail, parents, weight, bias = ctx.saved_tensors
    n = ctx.needs_input_grad
    inputs, needs = [v, conv_tail, weight], [n[0], n[1], n[3]]
    if ctx.has_bias:
        inputs, needs = inputs + [bias], needs + [n[4]]
    grads = grads_through(lambda v_, t_, w_, *b_: tree_dwconv_reference(v_, t_, parents, w_, *b_), inputs, needs,
                           grad_o)
    return grads[0], grads[1], None, grads[2], grads[3] if ctx.has_bias else None


torch.library.register_autograd("leanformer::tree_dwconv", _tree_dwconv_backward, setup_context=_tree_dwconv_setup)
