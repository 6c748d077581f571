"""Training a drafter by self-distillation: the base model stays frozen and its own next-token
distributions on text are the targets (no labels, no other model)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from leanformer.decoding.generate import generate
from leanformer.decoding.medusa import future_agreement, future_kl
from leanformer.training import random_windows, train


def draft_agreement(drafter: nn.Module, windows: Tensor) -> Dict[str, float]:
    """Top-1 agreement of each future offset with the frozen model on ``windows [n, N]``."""
    with torch.no_grad():
        agree = future_agreement(*reversed(drafter.sequence_drafts(windows)))
    return {f"agree@{k + 2}": round(a.item(), 4) for k, a in enumerate(agree)}


@torch.no_grad()
def greedy_corpus(model: nn.Module, tokens: Tensor, *, prompts: int, prompt_length: int, new_tokens: int,
                  batch: int = 32, seed: int = 0) -> Tensor:
    """Self-distillation data (Medusa-2): ``[prompts, prompt_length + new_tokens]``, random
    prompts from ``tokens`` each followed by the model's own greedy continuation, the text
    tree decoding will have to predict."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - prompt_length, (prompts,), generator=g).tolist()
    out = []
    for i in range(0, prompts, batch):
        p = torch.stack([tokens[s:s + prompt_length] for s in starts[i:i + batch]])
        out.append(torch.cat([p, generate(model, p, max_new_tokens=new_tokens).padded()], 1))
    return torch.cat(out)


def rank_accuracy(drafter: nn.Module, windows: Tensor, top_k: int) -> Tensor:
    """``[K, top_k]``: how often the drafter's rank-r candidate for future offset k is the frozen
    model's greedy token there, on ``windows [n, N]`` (the table
    :meth:`~leanformer.decoding.TreeShape.from_accuracies` builds a tree from)."""
    with torch.no_grad():
        teacher, drafts = drafter.sequence_drafts(windows)
    N, K = drafts.shape[1], drafts.shape[2]
    rows = []
    for k in range(min(K, N - 1)):
        cand = drafts[:, :N - k - 1, k].topk(top_k, dim=-1).indices  # [n, N - k - 1, top_k]
        hit = cand == teacher[:, k + 1:].argmax(-1, keepdim=True)
        rows.append(hit.float().flatten(0, 1).mean(0))
    return torch.stack(rows)


def distill(drafter: nn.Module, tokens: Tensor, val_windows: Tensor, *, steps: int, batch: int = 16,
            length: int = 64, lr: float = 1e-3, seed: int = 0, desc: str = "distill") -> List[dict]:
    """Trains ``drafter`` (MedusaHeads or HiddenTransfer) on random windows of ``tokens`` with
    the frozen model's predictions as targets; returns the evaluation history (top-1
    agreement per offset on ``val_windows``)."""
    model = drafter.model
    frozen = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        data = (w[:, :-1] for w in random_windows(tokens, batch, length, torch.Generator().manual_seed(seed)))
        return train(drafter, data, lambda d, ids: future_kl(*reversed(d.sequence_drafts(ids))), steps=steps, lr=lr, weight_decay=0.0,
                     evaluate=lambda d: draft_agreement(d, val_windows), eval_every=max(1, steps // 10),
                     warmup=min(50, steps // 5 + 1), desc=desc)
    finally:
        for p, f in zip(model.parameters(), frozen):
            p.requires_grad_(f)
