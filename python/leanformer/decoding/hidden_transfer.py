"""Hidden Transfer (Wu et al. 2024): learned linear maps turn a node's hidden state at an
intermediate layer into pseudo hidden states of the next K positions, which run through the
remaining layers in the SAME forward that verifies the current token tree, so drafting costs
no forward of its own."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from leanformer.decoding.medusa import future_kl
from leanformer.decoding.token_tree import TokenTree


def with_pseudo_tokens(tree_mask: Tensor, num_future: int) -> Tensor:
    """``[B, T, T]`` (or ``[T, T]``) ancestor mask -> ``[B, N, N]``, N = T (1 + K): the T real
    nodes, then node i's K pseudo tokens at ``T + i K + j``. Pseudo token (i, j) sees node i's
    ancestors, node i and its own predecessors (i, 0..j); no real node sees a pseudo token."""
    tm = tree_mask if tree_mask.dim() == 3 else tree_mask[None]
    B, T, K = tm.shape[0], tm.shape[-1], num_future
    out = torch.zeros(B, T * (1 + K), T * (1 + K), dtype=torch.bool, device=tm.device)
    out[:, :T, :T] = tm
    out[:, T:, :T] = tm.repeat_interleave(K, dim=1)
    own = torch.ones(K, K, dtype=torch.bool, device=tm.device).tril()
    out[:, T:, T:] = torch.block_diag(*[own] * T)
    return out


class HiddenTransfer(nn.Module):
    """Drafter for a :class:`~leanformer.models.LlamaLM`: ``num_future`` linear maps of the hidden
    state after ``layer`` blocks (``0 < layer < depth``) into pseudo hidden states at offsets
    ``1..K``, which pass through ``layers[layer:]`` next to the tree's real nodes (attending to
    the cached prefix, node i's branch and their own predecessors) and are read out by the LM
    head: the draft distributions of the K tokens after the next bonus token.

    The base model is held by reference (not a submodule) and stays frozen.

    Example::

        >>> ht = HiddenTransfer(model, layer=2, num_future=3)
        >>> out = leanformer.generate(model, ids, max_new_tokens=32, drafter=ht)
    """

    def __init__(self, model: nn.Module, layer: int, num_future: int):
        super().__init__()
        depth = len(getattr(model, "layers", []))
        if not hasattr(model, "run_layers"):
            raise TypeError(f"HiddenTransfer needs a LlamaLM (with run_layers), got {type(model).__name__}")
        if not 0 < layer < depth:
            raise ValueError(f"layer must be in 1..{depth - 1} (blocks before the transfer), got {layer}")
        if num_future < 1:
            raise ValueError(f"num_future must be >= 1, got {num_future}")
        dim = model.config.dim
        self.layer, self.num_future = layer, num_future
        self.__dict__["model"] = model
        self.transfers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_future))
        for t in self.transfers:  # start from "the next position looks like this one"
            nn.init.eye_(t.weight)
            nn.init.zeros_(t.bias)

    def _pseudo(self, h: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """``h [B, T, C]`` at ``positions [B, T]`` -> pseudo states ``[B, T K, C]`` and positions."""
        B, T, C = h.shape
        K = self.num_future
        x = torch.stack([t(h) for t in self.transfers], dim=2).reshape(B, T * K, C)
        pos = (positions[:, :, None] + torch.arange(1, K + 1, device=h.device)).reshape(B, T * K)
        return x, pos

    def _run(self, ids: Tensor, positions: Tensor, tree_mask: Tensor, cache=None) -> Tuple[Tensor, Tensor]:
        m, K = self.model, self.num_future
        B, T = ids.shape
        h = m.run_layers(m.embed(ids), positions, cache=cache, tree_mask=tree_mask, stop=self.layer)
        x, pos = self._pseudo(h, positions)
        out = m.run_layers(torch.cat([h, x], 1), torch.cat([positions, pos], 1), cache=cache,
                           tree_mask=with_pseudo_tokens(tree_mask, K), start=self.layer)
        logits = m.lm_head(m.norm(out))
        return logits[:, :T], logits[:, T:].reshape(B, T, K, -1)

    def tree_forward(self, runner, tree: TokenTree) -> Tuple[Tensor, Tensor]:
        """One forward: the tree's logits ``[B, T, V]`` and every node's draft logits ``[B, T, K, V]``.
        The pseudo tokens' K/V land in cache slots past the tree's, which compaction ignores."""
        cache = runner.cache
        return self._run(tree.tokens.clamp(min=0), cache.lens[:, None] + tree.depths, tree.mask, cache)

    def draft(self, features: Tensor, node: Tensor) -> Tensor:
        return features[torch.arange(features.shape[0], device=node.device), node]

    def distill_loss(self, ids: Tensor) -> Tensor:
        """KL from the frozen model: the pseudo token j of position t learns the model's
        prediction at t + j + 1. One dense forward: the sequence is a chain-shaped tree."""
        B, N = ids.shape
        with torch.no_grad():
            teacher = self.model(ids)
        chain = torch.ones(N, N, dtype=torch.bool, device=ids.device).tril()
        _, draft = self._run(ids, torch.arange(N, device=ids.device).expand(B, N), chain)
        return future_kl(draft, teacher)
