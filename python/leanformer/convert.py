"""In-place conversions of a model's layers to leanformer's sparse modules."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from leanformer.nn.mlp import MLP
from leanformer.nn.topk_mlp import TopKMLP


@torch.no_grad()
def to_topk_mlp(model: nn.Module, k: Optional[int] = None, ratio: Optional[float] = None, *,
                mode: str = "auto") -> List[str]:
    """Replaces every :class:`leanformer.nn.MLP` (ReLU or GELU) of ``model`` with a
    :class:`leanformer.nn.TopKMLP` holding the same weights, keeping ``k`` activations per token
    (or ``round(ratio * hidden)``; exactly one of the two). With ``k = hidden`` the outputs are
    unchanged. Returns the names of the converted modules; raises if there is none, or if an
    MLP's activation has no top-k kernel (SiLU)."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k and ratio")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is MLP]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no leanformer.nn.MLP to convert")
    converted = []
    for name, mlp in targets:
        if mlp.activation not in ("relu", "gelu"):
            raise ValueError(f"cannot convert {name}: top-k needs a relu or gelu MLP, it is {mlp.activation}")
        hidden = mlp.fc1.out_features
        kk = k if k is not None else int(round(ratio * hidden))
        if not 0 <= kk <= hidden:
            raise ValueError(f"cannot convert {name}: k={kk} is outside [0, hidden={hidden}]")
        new = TopKMLP(mlp.fc1.in_features, hidden, kk, mlp.activation, bias=mlp.fc1.bias is not None, mode=mode)
        new.load_state_dict(mlp.state_dict())
        new.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype).train(mlp.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        converted.append(name)
    return converted
