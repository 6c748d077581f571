"""Sorted fine-tuning (SoFT, Sorted LLaMA, Kavehzadeh et al. 2024): the language-modeling loss
summed over exits at chosen layers that share the model's one final norm and head, so that
the first ``l`` layers form a usable sub-model for every chosen ``l``."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.layers.stack import check_layer, forward, head, num_layers


def exit_losses(model: nn.Module, batch: Tensor, exits: Sequence[int], mask: Optional[Tensor] = None,
                from_position: int = 0) -> Dict[int, Tensor]:
    """Next-token cross-entropy of every exit in ``exits`` on ``batch [B, T + 1]`` (inputs and
    shifted targets), from one forward through the deepest exit; only the predictions from
    positions ``>= from_position`` count (all of them see their whole context)."""
    exits = sorted({check_layer(model, l, name="exit", allow_end=True) for l in exits})
    _, hidden = forward(model, batch[:, :-1], exit_layer=exits[-1], output_hidden_states=True, mask=mask)
    targets = batch[:, from_position + 1:].reshape(-1)
    out = {}
    for l in exits:
        logits = head(model, hidden[l], mask=mask)[:, from_position:]
        out[l] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
    return out


class SortedLoss(nn.Module):
    """``forward(batch) -> loss``: the sum of :func:`exit_losses` over ``exits`` (the last
    layer alone is ordinary training). A module, so DistributedDataParallel can wrap it and
    see every parameter used inside its forward."""

    def __init__(self, model: nn.Module, exits: Sequence[int]):
        super().__init__()
        self.model = model
        self.exits = sorted({check_layer(model, l, name="exit", allow_end=True) for l in exits})
        if not self.exits:
            raise ValueError("SortedLoss needs at least one exit")

    def forward(self, batch: Tensor) -> Tensor:
        return sum(exit_losses(self.model, batch, self.exits).values())


@torch.no_grad()
def exit_perplexities(model: nn.Module, windows: Tensor, exits: Optional[Sequence[int]] = None,
                      batch_size: int = 16, from_position: int = 0) -> Dict[int, float]:
    """Validation perplexity of every sub-model (exit; all of 1..L by default) on ``windows
    [N, T + 1]`` (the predictions from positions ``>= from_position``)."""
    exits = range(1, num_layers(model) + 1) if exits is None else exits
    totals: Dict[int, float] = {}
    chunks = windows.split(batch_size)
    for chunk in chunks:
        for l, loss in exit_losses(model, chunk, exits, from_position=from_position).items():
            totals[l] = totals.get(l, 0.0) + loss.item() * chunk.shape[0]
    return {l: math.exp(t / windows.shape[0]) for l, t in totals.items()}
