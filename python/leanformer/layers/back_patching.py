"""Back-patching ("Hopping Too Late", Biran et al. 2024): during the prefill, the hidden state of a
later layer ``j`` at the last position is written back into an earlier layer ``i < j`` and the
rest of the stack runs again from there, giving the later layers' computation a second pass.
A prediction the model got wrong and the patched run gets right was computed "too late"."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from leanformer.layers.stack import forward, num_layers, patch_layer


def _last_position(source: Tensor):
    def write(y: Tensor) -> Tensor:
        y = y.clone()
        y[:, -1] = source
        return y
    return write


@torch.no_grad()
def back_patching(model: nn.Module, windows: Tensor, batch_size: int = 64) -> List[Dict[str, float]]:
    """For every ``1 <= i < j <= L``: the next-token accuracy at the last position of ``windows
    [N, T + 1]`` (predicting token T) with hidden state ``j`` patched into hidden state ``i``, and
    the fractions of windows the patch fixes (wrong -> right) and breaks (right -> wrong).
    The first row (``i = j = 0``) is the unpatched model."""
    L = num_layers(model)
    pairs = [(i, j) for i in range(1, L) for j in range(i + 1, L + 1)]
    correct = {p: [] for p in pairs}
    base = []
    for chunk in windows.split(batch_size):
        ids, target = chunk[:, :-1], chunk[:, -1]
        logits, hidden = forward(model, ids, output_hidden_states=True)
        base.append(logits[:, -1].argmax(-1) == target)
        for i, j in pairs:
            # Hidden state i is block i-1's output.
            with patch_layer(model, i - 1, _last_position(hidden[j][:, -1])):
                correct[(i, j)].append(forward(model, ids)[:, -1].argmax(-1) == target)
    base = torch.cat(base)
    rows = [{"i": 0, "j": 0, "accuracy": base.float().mean().item(), "fixed": 0.0, "broken": 0.0}]
    for (i, j), c in correct.items():
        c = torch.cat(c)
        rows.append({"i": i, "j": j, "accuracy": c.float().mean().item(),
                     "fixed": (c & ~base).float().mean().item(), "broken": (~c & base).float().mean().item()})
    return rows
