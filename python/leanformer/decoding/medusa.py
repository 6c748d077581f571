"""Medusa heads (Cai et al. 2024), the standard drafting baseline: one residual SiLU block per
future offset on the last hidden state, read out by the model's own (frozen) LM head."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.decoding.stacked_linears import StackedLinears
from leanformer.decoding.token_tree import TokenTree


class MedusaHeads(nn.Module):
    """``num_future`` heads for a :class:`~leanformer.models.CausalLM`; head k maps the final
    hidden state at a position to the distribution of the token ``k + 2`` places after it (the
    LM head itself gives ``+1``). A step drafts from the one accepted node's hidden state, which
    the verifying forward already computed: drafting costs K small GEMMs and the head.

    The base model is held by reference, not as a submodule: the drafter's state_dict and
    optimizer cover the heads alone, and the base stays frozen.

    Example::

        >>> heads = MedusaHeads(model, num_future=3)
        >>> out = leanformer.generate(model, ids, max_new_tokens=32, drafter=heads)
    """

    def __init__(self, model: nn.Module, num_future: int):
        super().__init__()
        if num_future < 1:
            raise ValueError(f"num_future must be >= 1, got {num_future}")
        dim = model.lm_head.in_features
        self.num_future = num_future
        self.__dict__["model"] = model
        self.heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_future))
        for head in self.heads:  # Medusa's init: each head starts as the identity block
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.__dict__["_stacked"] = StackedLinears(self.heads)

    def head_logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., C]`` (final, normed) -> ``[..., num_future, V]``."""
        z = self._stacked.apply(hidden)  # all heads in one GEMM: [..., K C]
        z = z.unflatten(-1, (self.num_future, hidden.shape[-1]))
        return self.model.apply_head(hidden.unsqueeze(-2) + F.silu(z))

    def tree_forward(self, cache, tree: TokenTree) -> Tuple[Tensor, Tensor]:
        """The verifying forward of ``tree`` over ``cache``: ``(logits [B, T, V], final-normed
        hidden states [B, T, C])``, the latter what :meth:`draft` reads."""
        return self.model.tree_logits(cache, tree.tokens.clamp(min=0), tree.mask, tree.depths, tree.parents)

    def draft(self, features: Tensor, node: Tensor) -> Tensor:
        """Draft logits ``[B, num_future, V]`` after node ``node [B]`` of the last tree."""
        return self.head_logits(features[torch.arange(features.shape[0], device=node.device), node])

    def sequence_drafts(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """For training: the frozen model's logits ``[B, N, V]`` on ``ids`` and the heads' drafts
        ``[B, N, K, V]`` at every position (head k at t drafts token t + k + 2)."""
        with torch.no_grad():
            teacher, hidden = self.model(ids, return_hidden=True)
        return teacher, self.head_logits(hidden)


def future_kl_per_offset(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) ``[K]`` of each future offset, where ``student [B, N, K, V]`` at
    (t, k) predicts what the teacher ``[B, N, V]`` predicts at t + k + 1 (positions past the end
    are left out)."""
    N, K = student.shape[1], student.shape[2]
    losses = []
    for k in range(min(K, N - 1)):
        s = student[:, :N - k - 1, k].float().log_softmax(-1)
        t = teacher[:, k + 1:].float().log_softmax(-1)
        losses.append(F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean"))
    return torch.stack(losses)


def future_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """The drafters' training loss: :func:`future_kl_per_offset` averaged over the offsets."""
    return future_kl_per_offset(student, teacher).mean()


def future_agreement(student: Tensor, teacher: Tensor) -> Tensor:
    """Top-1 agreement ``[K]`` of each future offset with the teacher (as :func:`future_kl`)."""
    N, K = student.shape[1], student.shape[2]
    return torch.stack([(student[:, :N - k - 1, k].argmax(-1) == teacher[:, k + 1:].argmax(-1)).float().mean()
                        for k in range(min(K, N - 1))])
