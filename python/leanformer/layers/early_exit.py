"""Early exit in decoding, per token: MuE (Tang et al. 2023) leaves the stack once a layer barely
changes the hidden state, ``cos(layer output, layer input) > threshold``; the confidence rule
leaves once the shared head's top probability at that layer exceeds the threshold. The skipped
layers still get their cache written, from the exit layer's hidden state, so later tokens see a
full cache (the state a skipped SLA layer keeps, or a skipped softmax layer's K and V)."""
from __future__ import annotations

import math
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.layers.stack import forward, num_layers, stack

CRITERIA = ("cosine", "confidence")


def _exit_score(model, criterion: str, x: Tensor, y: Tensor, ctx: dict) -> Tensor:
    if criterion == "cosine":
        return F.cosine_similarity(y.float(), x.float(), dim=-1)[:, -1]
    return model.read_out(y, ctx)[:, -1].float().softmax(-1).amax(-1)


@torch.no_grad()
def step(model: nn.Module, token: Tensor, cache, *, criterion: str, threshold: float,
         min_layer: int = 1) -> tuple:
    """One decoding step of ``token [B, 1]`` with early exit per row: returns ``(logits [B, V],
    layers [B])``, the layers each row ran. Rows that exited pass their exit hidden state through
    the remaining layers only to fill the cache; once every row has exited, only the caches are
    filled (the saving at batch 1)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    model = stack(model)
    L = num_layers(model)
    ctx = model.call_context(token, cache)
    x = model.embed_tokens(token, ctx)
    exited = torch.zeros(token.shape[0], dtype=torch.bool, device=token.device)
    layers = torch.full((token.shape[0],), L, dtype=torch.long, device=token.device)
    for i in range(L):
        if bool(exited.all()):
            model.fill_block_cache(i, x, cache, ctx)
            continue
        y = model.run_block(i, x, cache, ctx)  # an exited row's x is its exit state: this fills its cache
        if i + 1 < L and i + 1 >= min_layer:
            leaving = ~exited & (_exit_score(model, criterion, x, y, ctx) > threshold)
            layers[leaving] = i + 1
        else:
            leaving = torch.zeros_like(exited)
        x = torch.where(exited[:, None, None], x, y)
        exited |= leaving
    model.finish_call(cache, ctx)
    return model.read_out(x, ctx)[:, -1], layers


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, *, criterion: str, threshold: float, prefill: int,
             min_layer: int = 1) -> Dict[str, float]:
    """Teacher-forced decoding of ``windows [N, T + 1]``: the first ``prefill`` tokens through the
    whole model, then one token at a time with early exit. Returns the perplexity of the decoded
    positions and the average number of layers they used."""
    if not 0 < prefill < windows.shape[1] - 1:
        raise ValueError(f"prefill must be in 1..{windows.shape[1] - 2} for windows of {windows.shape[1]} tokens, "
                         f"got {prefill}")
    cache = stack(model).new_cache(windows.shape[0], windows.shape[1])
    forward(model, windows[:, :prefill], cache=cache)
    nll, layers = 0.0, 0.0
    steps = windows.shape[1] - 1 - prefill
    for t in range(prefill, windows.shape[1] - 1):
        logits, used = step(model, windows[:, t:t + 1], cache, criterion=criterion, threshold=threshold,
                            min_layer=min_layer)
        nll += F.cross_entropy(logits.float(), windows[:, t + 1], reduction="sum").item()
        layers += used.sum().item()
    n = steps * windows.shape[0]
    return {"val_ppl": math.exp(nll / n), "avg_layers": layers / n}


@torch.no_grad()
def tokens_per_second(model: nn.Module, window: Tensor, *, criterion: str, threshold: float, prefill: int) -> float:
    """Decoding speed at batch 1 (teacher-forced on ``window [T + 1]``), after the prefill."""
    cache = stack(model).new_cache(1, window.shape[0])
    forward(model, window[None, :prefill], cache=cache)
    t0 = time.perf_counter()
    for t in range(prefill, window.shape[0] - 1):
        step(model, window[None, t:t + 1], cache, criterion=criterion, threshold=threshold)
    return (window.shape[0] - 1 - prefill) / (time.perf_counter() - t0)
