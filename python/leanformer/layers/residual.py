"""How much each attention and MLP sub-block writes into the residual stream ("Do Language Models
Use Their Depth Efficiently?", Csordas et al. 2025): for sub-block output ``h`` added to the
residual ``x``, the relative norm ``|h| / |x|`` and ``cos(h, x)``; and ``cos(x, x + h)``, whose
complement is LLM-Drop's importance (:mod:`leanformer.layers.drop`). Pre-norm blocks only: the
sub-block's output is exactly what is added to the stream."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.layers.stack import SUBLAYERS, blocks, forward, num_layers, stack

STATS = ("relative_norm", "cos_to_residual", "cos_in_out")


@contextlib.contextmanager
def _capture(model: nn.Module, record):
    """Calls ``record(layer, kind, residual_in, sublayer_out)`` for every sub-block that runs."""
    m = stack(model)
    handles, current = [], {}
    try:
        for i, block in enumerate(blocks(model)):
            def before(module, args, i=i):
                current[i] = args[0]
            handles.append(block.register_forward_pre_hook(before))
            for kind in SUBLAYERS:
                sub = m.sublayer(block, kind)
                if sub is None:
                    continue

                def after(module, args, out, i=i, kind=kind):
                    record(i, kind, current[i], out)
                    current[i] = current[i] + out  # the residual the next sub-block reads
                handles.append(sub.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def contributions(model: nn.Module, batches: Iterable[Tensor]) -> Dict[str, List[Dict[str, float]]]:
    """Per sub-block kind, per layer: the token averages of :data:`STATS` over ``batches`` of
    input ids (a dropped sub-block's entry is None)."""
    L = num_layers(model)
    sums = {k: [dict.fromkeys(STATS, 0.0) for _ in range(L)] for k in SUBLAYERS}
    counts = {k: [0] * L for k in SUBLAYERS}

    def record(i, kind, x, h):
        x, h = x.float().reshape(-1, x.shape[-1]), h.float().reshape(-1, h.shape[-1])
        s = sums[kind][i]
        s["relative_norm"] += (h.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        s["cos_to_residual"] += F.cosine_similarity(h, x, dim=-1).sum().item()
        s["cos_in_out"] += F.cosine_similarity(x, x + h, dim=-1).sum().item()
        counts[kind][i] += x.shape[0]

    with _capture(model, record):
        for ids in batches:
            forward(model, ids)
    return {k: [None if not counts[k][i] else {n: v / counts[k][i] for n, v in sums[k][i].items()}
                for i in range(L)] for k in SUBLAYERS}
