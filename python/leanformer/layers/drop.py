"""Layer dropping (LLM-Drop, "What Matters in Transformers? Not All Attention is Needed", He et
al. 2024): a sub-block's importance is ``1 - cos(input, output)`` of the residual stream around it
over calibration data; the least important attention sub-blocks are removed with
:func:`leanformer.layers.drop_modules` (their cache slots too)."""
from __future__ import annotations

from typing import Dict, Iterable, List

from torch import Tensor, nn

from leanformer.layers.residual import contributions


def importance(model: nn.Module, batches: Iterable[Tensor]) -> Dict[str, List[float]]:
    """``{"attention": [L], "mlp": [L]}``: 1 - the token-averaged cos(input, output) of each
    sub-block (None where already dropped)."""
    return {kind: [None if s is None else 1.0 - s["cos_in_out"] for s in per_layer]
            for kind, per_layer in contributions(model, batches).items()}


def drop_order(scores: List[float]) -> List[int]:
    """Layer indices from the least to the most important (dropped ones left out)."""
    return sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: scores[i])
