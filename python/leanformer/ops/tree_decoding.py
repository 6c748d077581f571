"""Tree-verified parallel decoding ops (Hidden Transfer / Medusa / EAGLE style).

A draft is a token tree of T nodes: node 0 is the root (the last verified token, whose K/V
is not in the cache yet), ``parents [T]`` (or ``[B, T]``) with ``parents[0] = -1`` and
``parents[i] < i``, and ``tree_mask bool [T, T]`` (or ``[B, T, T]``) with ``[i, j]`` true iff
j is i or an ancestor of i. The position id of node i is ``cache_lens[b] + depth[i]``.
Tree token padding is -1, never a real id.

The kernels are torch.ops.leanformer.tree_attention / tree_linear_attention /
verify_tree_greedy / verify_tree_sampling / compact_kv_cache / sla_tree_commit / tree_dwconv
(C++ on CPU, CUDA on GPU). This file gives them typed wrappers, fake kernels for torch.compile
and export, and the probability warp (temperature, top-k, top-p) that plain sampling and tree
verification share, so the two sample the same distribution.

tree_attention, tree_linear_attention and tree_dwconv are differentiable: their backward
recomputes through the PyTorch reference (what training a drafter through a tree needs).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.leanformer

Verification = Tuple[Tensor, Tensor, Tensor]


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


def warp_logits(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``logits [..., V]``, in fp32; removed
    tokens get -inf. Plain sampling and tree verification both warp with this.

    top-p keeps the most probable tokens until the mass before the next one reaches top_p
    (at least one token), as Hugging Face's TopPLogitsWarper does."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling (use greedy decoding for 0), got {temperature}")
    x = logits.float() / temperature
    V = x.shape[-1]
    if top_k is not None:
        if not 1 <= top_k:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < V:
            kth = x.topk(top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1:
            sorted_x, order = x.sort(dim=-1, descending=True)
            p = sorted_x.softmax(-1)
            mass_before = p.cumsum(-1) - p
            drop = mass_before >= top_p
            drop[..., 0] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def warp_probs(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None) -> Tensor:
    """``softmax(warp_logits(logits, ...))`` in fp32: the distribution a sampler draws from."""
    return warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)


def verify_tree_sampling(logits: Tensor, tree_tokens: Tensor, parents: Tensor, *,
                         generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None,
                         inputs_are_probs: bool = False) -> Verification:
    """Lossless sampling verification of a tree of deterministic drafts (the EAGLE rule).

    At the current node with target distribution p (``warp_probs`` of its logits), try its
    children in order, accepting child x with probability p(x); on rejection set p(x) = 0
    and renormalize; if every child is rejected (or there is none), the bonus token is drawn
    from the residual p. The tokens produced are distributed exactly as plain sampling from
    the warped target. Children with token -1 are skipped.

    Args:
        logits: ``[B, T, V]`` the target's logits at the tree nodes, or with
            ``inputs_are_probs=True`` already warped probabilities (then temperature, top_k
            and top_p must be left at their defaults).
        tree_tokens, parents: as in :func:`verify_tree_greedy`.
        generator: draws the ``[B, T]`` uniforms the kernel consumes in a fixed order.
        temperature, top_k, top_p: the warp, as in :func:`warp_logits`.

    Returns:
        ``(accepted [B, T], num_accepted [B], bonus [B])`` as :func:`verify_tree_greedy`.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> acc, n, bonus = verify_tree_sampling(torch.randn(2, 3, 10), torch.tensor([[5, 3, 7]] * 2),
        ...                                      torch.tensor([-1, 0, 0]), generator=g, top_k=4)
    """
    if inputs_are_probs:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("inputs_are_probs=True takes probabilities that are already warped; "
                             "leave temperature, top_k and top_p at their defaults")
        probs = logits
    else:
        probs = warp_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if probs.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(probs.shape)}")
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


# ---- fake kernels: shapes and dtypes only, for torch.compile / export ----

@torch.library.register_fake("leanformer::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask, scale):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))


@torch.library.register_fake("leanformer::tree_linear_attention")
def _tree_linear_attention_fake(q, k, v, S, z, tree_mask, eps):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def _verification_fake(scores, tree_tokens):
    B, T = scores.shape[:2]
    return (tree_tokens.new_empty((B, T)), tree_tokens.new_empty((B,)), tree_tokens.new_empty((B,)))


@torch.library.register_fake("leanformer::verify_tree_greedy")
def _verify_tree_greedy_fake(logits, tree_tokens, parents):
    return _verification_fake(logits, tree_tokens)


@torch.library.register_fake("leanformer::verify_tree_sampling")
def _verify_tree_sampling_fake(probs, tree_tokens, parents, uniforms):
    return _verification_fake(probs, tree_tokens)


@torch.library.register_fake("leanformer::compact_kv_cache")
def _compact_kv_cache_fake(k_cache, v_cache, cache_lens, accepted, num_accepted):
    return None


@torch.library.register_fake("leanformer::sla_tree_commit")
def _sla_tree_commit_fake(S, z, conv_tail, k, v, path, num_accepted):
    return None


@torch.library.register_fake("leanformer::tree_dwconv")
def _tree_dwconv_fake(v, conv_tail, parents, weight, bias):
    return v.new_empty(v.shape)


# ---- autograd: the forward is the fused kernel; the backward recomputes the attention through
# the dense PyTorch reference (O(T (L + T)) memory), which is what training a drafter through
# the tree ops needs (short sequences); decoding never runs it ----

def _grads_through(reference, diff_inputs, needs, grad_o, *rest_args):
    """Gradients of ``reference(*diff_inputs, ...)`` for the inputs whose ``needs`` is set."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(diff_inputs, needs)]
        o = reference(*leaves, *rest_args)
        wanted = [x for x in leaves if x.requires_grad]
        got = iter(torch.autograd.grad(o, wanted, grad_o) if wanted else [])
    return [next(got) if x.requires_grad else None for x in leaves]


def _tree_attention_setup(ctx, inputs, output):
    q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask)
    ctx.scale = scale


def _tree_attention_backward(ctx, grad_o):
    from leanformer.reference.tree_decoding import tree_attention_reference

    q, k_cache, v_cache, cache_lens, k_tree, v_tree, tree_mask = ctx.saved_tensors
    n = ctx.needs_input_grad

    def ref(q_, kc, vc, kt, vt):
        return tree_attention_reference(q_, kc, vc, cache_lens, kt, vt, tree_mask, ctx.scale)

    gq, gkc, gvc, gkt, gvt = _grads_through(ref, [q, k_cache, v_cache, k_tree, v_tree],
                                            [n[0], n[1], n[2], n[4], n[5]], grad_o)
    return gq, gkc, gvc, None, gkt, gvt, None, None


def _tree_linear_attention_setup(ctx, inputs, output):
    q, k, v, S, z, tree_mask, eps = inputs
    ctx.save_for_backward(q, k, v, S, z, tree_mask)
    ctx.eps = eps


def _tree_linear_attention_backward(ctx, grad_o):
    from leanformer.reference.tree_decoding import tree_linear_attention_reference

    q, k, v, S, z, tree_mask = ctx.saved_tensors
    n = ctx.needs_input_grad

    def ref(q_, k_, v_, S_, z_):
        return tree_linear_attention_reference(q_, k_, v_, S_, z_, tree_mask, ctx.eps)

    return (*_grads_through(ref, [q, k, v, S, z], n[:5], grad_o), None, None)


torch.library.register_autograd("leanformer::tree_attention", _tree_attention_backward,
                                setup_context=_tree_attention_setup)
torch.library.register_autograd("leanformer::tree_linear_attention", _tree_linear_attention_backward,
                                setup_context=_tree_linear_attention_setup)


def _tree_dwconv_setup(ctx, inputs, output):
    v, conv_tail, parents, weight, bias = inputs
    ctx.save_for_backward(v, conv_tail, parents, weight, bias)
    ctx.has_bias = bias is not None


def _tree_dwconv_backward(ctx, grad_o):
    from leanformer.reference.tree_decoding import tree_dwconv_reference

    v, conv_tail, parents, weight, bias = ctx.saved_tensors
    n = ctx.needs_input_grad
    inputs, needs = [v, conv_tail, weight], [n[0], n[1], n[3]]
    if ctx.has_bias:
        inputs, needs = inputs + [bias], needs + [n[4]]
    grads = _grads_through(lambda v_, t_, w_, *b_: tree_dwconv_reference(v_, t_, parents, w_, *b_), inputs, needs,
                           grad_o)
    return grads[0], grads[1], None, grads[2], grads[3] if ctx.has_bias else None


torch.library.register_autograd("leanformer::tree_dwconv", _tree_dwconv_backward, setup_context=_tree_dwconv_setup)
