"""Measurements of a model's internals: the activation sparsity of its MLPs (the Lazy Neuron
phenomenon: trained ReLU transformers have few non-zero activations)."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.nn.mlp import MLP
from leanformer.nn.topk_mlp import TopKMLP

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@torch.no_grad()
def activation_sparsity(model: nn.Module, batches: Iterable, *,
                        run: Callable[[nn.Module, object], Optional[Tensor]] = None,
                        ratios: Sequence[float] = (0.5, 0.25, 0.1, 0.05)) -> Dict[str, dict]:
    """Per MLP of ``model`` (``leanformer.nn.MLP`` or ``TopKMLP``), over every token of ``batches``:

    - ``nonzero_fraction``: the fraction of activations that are not zero (the Lazy Neuron
      measurement; meaningful for ReLU, about 1 for GELU);
    - ``topk_mass``: for each ratio r, the mean fraction of a token's activation mass
      (sum of |act|) held by its ``round(r * hidden)`` largest activations (the GELU measure).

    ``run(model, batch)`` runs the model on one batch and returns a bool mask of the tokens to
    count (``[B, T]``, e.g. the attention mask, padding excluded) or None for all; by default
    ``model(batch)``. Hooks are removed afterwards, also on error.
    """
    run = run or (lambda m, b: (m(b), None)[1])
    mlps = {name: m for name, m in model.named_modules() if isinstance(m, (MLP, TopKMLP))}
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no leanformer MLP to measure")
    pending: Dict[str, list] = {name: [] for name in mlps}
    totals = {name: {"tokens": 0, "nonzero": 0.0, "mass": torch.zeros(len(ratios), dtype=torch.float64)}
              for name in mlps}

    def hook(name, act_fn):
        def fn(_module, _inputs, out):
            pending[name].append(act_fn(out.float()))
        return fn

    handles = [m.fc1.register_forward_hook(hook(name, _ACT[m.activation])) for name, m in mlps.items()]
    try:
        for batch in batches:
            for p in pending.values():
                p.clear()
            mask = run(model, batch)
            for name, acts in pending.items():
                for a in acts:
                    a = a.reshape(-1, a.shape[-1]) if mask is None else a[mask.to(a.device)]
                    t = totals[name]
                    t["tokens"] += a.shape[0]
                    t["nonzero"] += (a != 0).sum().item() / a.shape[-1]
                    mag = a.abs()
                    total = mag.sum(-1).clamp_min(1e-30)
                    top = mag.sort(-1, descending=True).values.cumsum(-1)
                    for i, r in enumerate(ratios):
                        k = int(round(r * a.shape[-1]))
                        held = top[:, k - 1] if k > 0 else torch.zeros_like(total)
                        t["mass"][i] += (held / total).double().sum()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, t in totals.items():
        n = max(t["tokens"], 1)
        out[name] = {"tokens": t["tokens"], "nonzero_fraction": t["nonzero"] / n,
                     "topk_mass": {float(r): (t["mass"][i] / n).item() for i, r in enumerate(ratios)}}
    return out
