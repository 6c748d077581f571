"""Reading the prediction out of every layer. The logit lens (nostalgebraist 2020) applies the
model's own final norm and head to hidden state ``l``; the tuned lens (Belrose et al. 2023)
first maps it with one affine translator per layer, trained by the KL divergence to the model's
final distribution. At the last layer both are exactly the model."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.layers.stack import forward, head, num_layers


class TunedLens(nn.Module):
    """One ``Linear(dim, dim)`` per hidden state ``0..L-1``, initialized to the identity (the
    logit lens); hidden state ``L`` has none (the model's own output)."""

    def __init__(self, model: nn.Module, dim: int):
        super().__init__()
        self.translators = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers(model)))
        for t in self.translators:
            nn.init.eye_(t.weight)
            nn.init.zeros_(t.bias)

    def translate(self, hidden: Tensor, layer: int) -> Tensor:
        return hidden if layer == len(self.translators) else self.translators[layer](hidden)


class TunedLensLoss(nn.Module):
    """``forward(ids) -> loss``: the KL divergence from the frozen model's final distribution to
    every tuned layer's, summed over layers (a module, so DistributedDataParallel can wrap it)."""

    def __init__(self, model: nn.Module, lens: TunedLens):
        super().__init__()
        self.lens = lens
        self.frozen = [model.requires_grad_(False).eval()]  # a list: not a submodule to train

    def forward(self, batch: Tensor) -> Tensor:
        model = self.frozen[0]
        with torch.no_grad():
            final, hidden = forward(model, batch[:, :-1], output_hidden_states=True)
            target = final.float().log_softmax(-1)
        loss = 0.0
        for l in range(len(self.lens.translators)):
            logp = head(model, self.lens.translate(hidden[l], l)).float().log_softmax(-1)
            loss = loss + F.kl_div(logp, target, log_target=True, reduction="batchmean") / batch.shape[1]
        return loss


@torch.no_grad()
def lens_table(model: nn.Module, windows: Tensor, lens: TunedLens = None, batch_size: int = 16) -> List[Dict[str, float]]:
    """Per hidden state ``0..L``: the lens's perplexity on the true next tokens, the KL divergence
    from the model's final distribution (nats per token) and how often its top-1 token is the
    model's (the logit lens when ``lens`` is None)."""
    L = num_layers(model)
    tot = [dict(nll=0.0, kl=0.0, top1=0.0) for _ in range(L + 1)]
    n = 0
    for chunk in windows.split(batch_size):
        final, hidden = forward(model, chunk[:, :-1], output_hidden_states=True)
        final = final.float().log_softmax(-1).flatten(0, 1)
        targets = chunk[:, 1:].reshape(-1)
        for l in range(L + 1):
            h = hidden[l] if lens is None else lens.translate(hidden[l], l)
            logp = head(model, h).float().log_softmax(-1).flatten(0, 1)
            tot[l]["nll"] += F.nll_loss(logp, targets, reduction="sum").item()
            tot[l]["kl"] += (final.exp() * (final - logp)).sum().item()
            tot[l]["top1"] += (logp.argmax(-1) == final.argmax(-1)).sum().item()
        n += targets.numel()
    return [{"layer": l, "val_ppl": math.exp(t["nll"] / n), "kl_to_final": t["kl"] / n, "top1_agreement": t["top1"] / n}
            for l, t in enumerate(tot)]
