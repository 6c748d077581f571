"""Hidden Transfer (Wu et al. 2024): learned linear maps turn a node's hidden state at an
intermediate layer into pseudo hidden states of the next K positions, which run through the
remaining layers in the SAME forward that verifies the current token tree, so drafting costs
no forward of its own.

The accepted node is unknown until verification, so pseudo tokens would be needed at every
node. They go only to anchor nodes: the tree's main chain (the root and each node's
best-ranked child, the path accepted when every draft is right) and, with ``branch_depth`` b,
every node of depth <= b (verification most often leaves the chain near the root): T + S K
tokens in the upper layers for S anchors instead of T (1 + K). When verification stops at a
node that is no anchor, the drafts come from the deepest anchor on the accepted path, shifted
by the depth between the two: its pseudo tokens are guesses for fixed positions, not for the
branch taken."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.decoding.stacked_linears import StackedLinears
from leanformer.decoding.token_tree import TokenTree
from leanformer.models import LlamaLM, SLABLM


def main_chain(parents: Tensor, depths: Tensor) -> Tensor:
    """``[B, S]``: the root, its first child, that node's first child, ... (S = the deepest
    depth + 1); -1 where a sequence's chain ended earlier. In a static tree the first child is
    the rank-0 candidate; in a dynamic tree the best-scored one."""
    B, T = parents.shape
    idx = torch.arange(T, device=parents.device)
    cur = torch.zeros(B, dtype=torch.long, device=parents.device)
    out = [cur]
    for _ in range(int(depths.max())):
        child = (parents == cur[:, None]) & (idx > 0) & (cur[:, None] >= 0)
        first = torch.where(child, idx, T).min(1).values
        cur = torch.where(first < T, first, -1)
        out.append(cur)
    return torch.stack(out, 1)


def anchor_nodes(parents: Tensor, depths: Tensor, branch_depth: int) -> Tensor:
    """``[B, S]``: the :func:`main_chain`, then every other node of depth 1..``branch_depth``
    (in node order); -1 pads the sequences with fewer."""
    chain = main_chain(parents, depths)
    if branch_depth < 1:
        return chain
    B, T = parents.shape
    idx = torch.arange(T, device=parents.device).expand(B, T)
    on_chain = (idx[:, :, None] == chain[:, None, :]).any(-1)
    extra = (depths.expand(B, T) >= 1) & (depths.expand(B, T) <= branch_depth) & ~on_chain
    n = int(extra.sum(1).max())
    # the extra nodes first, in node order (a stable sort of "not extra"), then -1 padding
    order = torch.sort((~extra).to(torch.int8), dim=1, stable=True).indices[:, :n]
    picked = torch.where(extra.gather(1, order), order, -1)
    return torch.cat([chain, picked], 1)


def attach_pseudo_tokens(mask: Tensor, depths: Tensor, parents: Tensor, anchors: Tensor,
                         num_future: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The tree extended by K pseudo tokens after each anchor node: ``mask [B, T, T]``,
    ``depths``/``parents [B, T]`` and ``anchors [B, S]`` (-1: none; its pseudo tokens hang off
    the root and are never read) -> ``(mask [B, N, N], depths [B, N], parents [B, N])``,
    N = T + S K, pseudo token j of anchor s at ``T + s K + j``: a chain below its anchor
    (seeing the anchor's ancestors, the anchor and its own predecessors), at depth
    ``depth(anchor) + j + 1``. No real node sees a pseudo token."""
    B, T = depths.shape
    S, K = anchors.shape[1], num_future
    dev = depths.device
    a = anchors.clamp(min=0)
    b = torch.arange(B, device=dev)[:, None]
    N = T + S * K
    out = torch.zeros(B, N, N, dtype=torch.bool, device=dev)
    out[:, :T, :T] = mask
    out[:, T:, :T] = mask[b, a].repeat_interleave(K, dim=1)
    own = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
    out[:, T:, T:] = torch.block_diag(*[own] * S)
    j = torch.arange(K, device=dev)
    pd = (depths.gather(1, a)[:, :, None] + j + 1).reshape(B, S * K)
    chain = T + torch.arange(S, device=dev)[:, None] * K + j - 1  # predecessor (s, j - 1)
    pp = torch.where(j == 0, a[:, :, None], chain).reshape(B, S * K)
    return out, torch.cat([depths.expand(B, T), pd], 1), torch.cat([parents.expand(B, T), pp], 1)


def draft_routes(anchors: Tensor, mask: Tensor, depths: Tensor, num_future: int) -> Tuple[Tensor, Tensor]:
    """Where each node's drafts come from: ``(pos [B, T, K], valid [B, T, K])``, ``pos`` indexing
    the ``S K`` pseudo tokens (anchor-major). Node i reads the deepest anchor on its path (itself
    when it is one; the root always is), shifted by the depth between them; ``valid`` is False
    past the pseudo tokens' reach. For every node at once, so a static tree computes it once and
    a decoding step only gathers."""
    B, S = anchors.shape
    K = num_future
    a = anchors.clamp(min=0)
    on_path = mask.gather(2, a[:, None, :].expand(B, mask.shape[1], S)) & (anchors >= 0)[:, None, :]  # [B, T, S]
    anchor_depth = torch.where(on_path, depths.expand(B, -1).gather(1, a)[:, None, :], -1)
    best = anchor_depth.max(-1)
    shift = depths.expand(B, -1) - best.values  # [B, T]
    idx = shift[..., None] + torch.arange(K, device=anchors.device)
    return best.indices[..., None] * K + idx.clamp(max=K - 1), idx < K


class Drafts(NamedTuple):
    """What a Hidden Transfer tree forward leaves for drafting: the pseudo tokens' logits
    ``[B, S, K, V]`` of the anchor nodes ``anchors [B, S]`` (-1: none), and each tree node's
    draft route (:func:`draft_routes`)."""

    logits: Tensor
    anchors: Tensor
    routes: Tuple[Tensor, Tensor]


def _llama_chain_drafts(ht: "HiddenTransfer", ids: Tensor) -> Tuple[Tensor, Tensor]:
    """:meth:`HiddenTransfer.sequence_drafts` for a LlamaLM, without the dense ``[N(1 + K)]^2``
    tree mask: the real tokens run once, frozen, as a prefill into a cache (they are the
    teacher's forward, and no pseudo token reaches them); then each position's K pseudo tokens
    run as a batch row of their own through the upper blocks, their queries against the real
    keys up to their position and their own chain, through the model's own attention
    (:meth:`~leanformer.models.llama.LlamaAttention.attend`). Same math as the tree forward,
    with ``N K (N + K)`` attention scores instead of ``(N (1 + K))^2`` and no gradient through
    the real rows.

    ``isolate_offsets``: the chain's keys and values come twice, detached and live; pseudo token
    j reads the detached copies of the tokens before it and the live copy of itself only, so
    each query sees the same keys and values as without the cut, and no gradient flows from
    pseudo j into an earlier pseudo token."""
    model, (B, N) = ht.model, ids.shape
    K = ht.num_future
    with torch.no_grad():
        cache = model.new_cache(B, N)  # the real tokens' K/V, which the pseudo tokens read
        ctx = model.call_context(ids, cache)
        h = model.run_blocks(model.embed_tokens(ids, ctx), cache, ctx, 0, ht.layer)
        teacher = model.read_out(model.run_blocks(h, cache, ctx, ht.layer), ctx)
    dev = ids.device
    t, j = torch.arange(N, device=dev), torch.arange(K, device=dev)
    positions = (t[:, None] + j + 1).reshape(N * K).expand(B, N * K)
    # row b N + t holds position t's K pseudo queries; its keys: the N real ones (visible up to
    # t), then its own chain (detached copies and live keys with isolate_offsets)
    sees_real = (t[None, :] <= t[:, None])[:, None, :].expand(N, K, N)
    chain = [j[None, :] < j[:, None], j[None, :] == j[:, None]] if ht.isolate_offsets else [j[None, :] <= j[:, None]]
    mask = torch.cat([sees_real, *(c.expand(N, K, K) for c in chain)], -1).repeat(B, 1, 1)
    mask = torch.zeros(mask.shape, dtype=h.dtype, device=dev).masked_fill_(~mask, float("-inf"))  # additive: faster
    p = ht._pseudo(h)
    for i, s in enumerate(ctx["slots"][ht.layer:], ht.layer):
        block = model.layers[i]
        if s is not None:
            a = block.attn
            q, k, v = a.qkv(block.attn_norm(p), positions)
            keys, values = ([c[s][:, None, :N].expand(B, N, N, a.num_kv_heads, a.head_dim)]
                            + ([own.detach(), own] if ht.isolate_offsets else [own])
                            for c, own in ((cache.k, k.view(B, N, K, a.num_kv_heads, a.head_dim)),
                                           (cache.v, v.view(B, N, K, a.num_kv_heads, a.head_dim))))
            o = a.attend(q.reshape(B * N, K, a.num_heads, a.head_dim), torch.cat(keys, 2).flatten(0, 1),
                         torch.cat(values, 2).flatten(0, 1), mask)
            p = p + a.o_proj(o.reshape(B, N * K, -1))
        if block.mlp is not None:
            p = p + block.mlp(block.mlp_norm(p))
    return teacher, ht._read(p).view(B, N, K, -1)


class HiddenTransfer(nn.Module):
    """Drafter for a :class:`~leanformer.models.LlamaLM` or a SLA :class:`~leanformer.models.SLABLM`:
    ``num_future`` linear maps of the hidden state after ``layer`` blocks
    (``0 < layer < depth``) into pseudo hidden states at offsets ``1..K``, which pass through
    the remaining blocks next to the tree's real nodes (seeing the prefix, their anchor's branch
    and their own predecessors) and are read out by the LM head: the draft distributions of the
    K tokens after the next bonus token. Anchors: the tree's main chain and every node of depth
    <= ``branch_depth`` (0: the chain alone, the cheapest).

    ``readout=True`` (not in the paper) puts a trainable Medusa-style block (``h + SiLU(W_k h)``,
    one per offset, starting at the identity) between the final norm and the frozen LM head of
    the pseudo tokens: the paper reads them with the LM head alone, which was made for real
    tokens' states.

    ``isolate_offsets=True`` (training only, LlamaLM only; not in the paper) trains each offset's
    transfer on its own offset's loss: pseudo token j still attends to the earlier pseudo tokens
    of its chain, but without a gradient into them. Otherwise the first transfer (offset 2, the
    draft on every path of the tree) is also pulled by the losses of offsets 3..K that read it.
    The forward, and so decoding, is the same either way.

    The base model is held by reference (not a submodule) and stays frozen.

    When to pick it: a tree forward with Hidden Transfer does all that a Medusa step does plus
    the pseudo tokens' rows through the upper blocks, so it pays off only where extra rows are
    nearly free (a memory-bound GPU forward, the paper's setting). On a CPU, where a forward
    costs about its rows, :class:`MedusaHeads` usually decodes faster.

    Example::

        >>> ht = HiddenTransfer(model, layer=2, num_future=3)
        >>> out = leanformer.generate(model, ids, max_new_tokens=32, drafter=ht)
    """

    def __init__(self, model: nn.Module, layer: int, num_future: int, branch_depth: int = 1, readout: bool = False,
                 isolate_offsets: bool = False):
        super().__init__()
        if isinstance(model, LlamaLM):
            depth = len(model.layers)
        elif isinstance(model, SLABLM):
            if model.config.attention != "sla":
                raise ValueError("HiddenTransfer on a SLABLM needs attention='sla' (tree decoding runs on its state)")
            if isolate_offsets:  # its pseudo tokens meet in the tree ops, which have no per-pair gradient cut
                raise ValueError("isolate_offsets needs a LlamaLM (its training forward); got a SLABLM")
            depth = len(model.blocks)
        else:
            raise TypeError(f"HiddenTransfer needs a LlamaLM or a SLABLM, got {type(model).__name__}")
        if not 0 < layer < depth:
            raise ValueError(f"layer must be in 1..{depth - 1} (blocks before the transfer), got {layer}")
        if num_future < 1:
            raise ValueError(f"num_future must be >= 1, got {num_future}")
        if branch_depth < 0:
            raise ValueError(f"branch_depth must be >= 0 (0: the main chain alone), got {branch_depth}")
        dim = model.config.dim
        self.layer, self.num_future, self.branch_depth = layer, num_future, branch_depth
        self.isolate_offsets = isolate_offsets
        self.__dict__["model"] = model
        self.transfers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_future))
        for t in self.transfers:  # start from "the next position looks like this one"
            nn.init.eye_(t.weight)
            nn.init.zeros_(t.bias)
        self.__dict__["_stacked"] = StackedLinears(self.transfers)
        self.readouts = None
        if readout:
            self.readouts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_future))
            for r in self.readouts:  # Medusa's init: the identity block, so training starts from plain HT
                nn.init.zeros_(r.weight)
                nn.init.zeros_(r.bias)
            self.__dict__["_readout_stack"] = StackedLinears(self.readouts)

    def _pseudo(self, h: Tensor) -> Tensor:
        """Anchor states ``h [B, S, C]`` -> pseudo states ``[B, S K, C]`` (anchor-major)."""
        B, S, C = h.shape
        # all K maps in one GEMM: [B, S, K C], pseudo token j of anchor s at s K + j
        return self._stacked.apply(h).reshape(B, S * self.num_future, C)

    def _read(self, p: Tensor) -> Tensor:
        """Pseudo tokens' final states ``p [B, S K, C]`` (anchor-major, before the final norm) ->
        their logits ``[B, S K, V]``."""
        h = self.model.final_norm(p)
        if self.readouts is not None:
            B, SK, C = h.shape
            K = self.num_future
            w, b = self._readout_stack()  # [K C, C]: offset k's block applies to pseudo tokens s K + k only
            hk = h.view(B, SK // K, K, C)
            z = torch.einsum("bskc,kdc->bskd", hk, w.view(K, C, C)) + b.view(K, C)
            h = (hk + F.silu(z)).view(B, SK, C)
        return self.model.apply_head(h)

    def _forward(self, cache, tokens: Tensor, mask: Tensor, depths: Tensor, parents: Tensor,
                 anchors: Tensor, extended=None) -> Tuple[Tensor, Tensor]:
        """Real nodes through every block over ``cache``, the anchors' pseudo tokens from
        ``layer`` on: ``(logits of the real nodes [B, T, V], of the pseudo tokens [B, S, K, V])``."""
        model = self.model
        B, T = tokens.shape
        K = self.num_future
        with torch.no_grad():  # the frozen model below the transfer: nothing to train there
            ctx = model.tree_context(cache, mask, depths, parents)
            h = model.run_blocks(model.embed_tokens(tokens, ctx), cache, ctx, 0, self.layer)
        h_anchor = h[torch.arange(B, device=h.device)[:, None], anchors.clamp(min=0)]
        mask_x, depths_x, parents_x = extended or attach_pseudo_tokens(mask, depths, parents, anchors, K)
        ctx = model.tree_context(cache, mask_x, depths_x, parents_x)
        out = model.run_blocks(torch.cat([h, self._pseudo(h_anchor)], 1), cache, ctx, self.layer)
        if self.readouts is None:  # real and pseudo rows share the LM head: one GEMM
            logits = model.read_out(out, ctx)
            return logits[:, :T], logits[:, T:].reshape(B, anchors.shape[1], K, -1)
        return model.read_out(out[:, :T], ctx), self._read(out[:, T:]).reshape(B, anchors.shape[1], K, -1)

    def tree_forward(self, cache, tree: TokenTree) -> Tuple[Tensor, Drafts]:
        """One forward over ``cache``: the tree's logits ``[B, T, V]``, and the anchors' drafts."""
        B = tree.tokens.shape[0]
        if tree.shape is not None:  # a static shape: its anchors, extension and routes are fixed
            anchors, ext, routes = tree.shape.cached(
                ("hidden-transfer", self.num_future, self.branch_depth), tree.tokens.device,
                lambda: self._extension(tree.mask[:1], tree.depths[:1], tree.parents[:1]))
            anchors, ext, routes = (anchors.expand(B, -1), tuple(t.expand(B, *t.shape[1:]) for t in ext),
                                    tuple(t.expand(B, *t.shape[1:]) for t in routes))
        else:
            anchors, ext, routes = self._extension(tree.mask, tree.depths, tree.parents)
        logits, pseudo = self._forward(cache, tree.tokens.clamp(min=0), tree.mask, tree.depths, tree.parents,
                                       anchors, ext)
        return logits, Drafts(pseudo, anchors, routes)

    def _extension(self, mask: Tensor, depths: Tensor, parents: Tensor):
        anchors = anchor_nodes(parents, depths, self.branch_depth)
        return (anchors, attach_pseudo_tokens(mask, depths, parents, anchors, self.num_future),
                draft_routes(anchors, mask, depths, self.num_future))

    def draft(self, features: Drafts, node: Tensor) -> Tensor:
        """Draft logits ``[B, K, V]`` after the last accepted node ``node [B]``: the pseudo tokens
        of the deepest anchor on its path (the node itself when it is one), shifted by the depth
        between them; positions past the pseudo tokens' reach get flat logits (their candidates
        are rarely accepted)."""
        B, S, K, V = features.logits.shape
        b = torch.arange(B, device=node.device)
        pos, valid = (t[b, node] for t in features.routes)  # [B, K]
        out = features.logits.view(B, S * K, V)[b[:, None], pos]
        return torch.where(valid[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))

    def sequence_drafts(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """For training: the frozen model's logits ``[B, N, V]`` and the drafts ``[B, N, K, V]``
        of every position's pseudo tokens (pseudo token j of position t drafts token
        t + j + 2). One forward: the sequence is a chain-shaped tree with every node an anchor
        (for a LlamaLM, computed without the dense tree mask: :func:`_llama_chain_drafts`)."""
        B, N = ids.shape
        if isinstance(self.model, LlamaLM):
            return _llama_chain_drafts(self, ids)
        with torch.no_grad():
            teacher = self.model(ids)
        dev = ids.device
        # an empty prefix (the zero state): the tree ops then compute the causal sequence
        cache = self.model.new_cache(B)
        self.model.prefill(cache, ids[:, :0], torch.zeros(B, dtype=torch.long, device=dev))
        pos = torch.arange(N, device=dev)
        mask = torch.ones(N, N, dtype=torch.bool, device=dev).tril().expand(B, N, N)
        _, drafts = self._forward(cache, ids, mask, pos.expand(B, N), (pos - 1).expand(B, N), pos.expand(B, N))
        return teacher, drafts
