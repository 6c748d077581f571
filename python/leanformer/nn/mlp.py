"""The transformer's two-layer MLP, with the layer names (fc1, fc2) the fold and the
sparse-MLP conversions look for."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; x ``[..., dim]``.

    Args:
        dim: input and output width; hidden: fc1's output width.
        activation: "gelu" (ViT), "relu" (the Lazy Neuron measurement) or "silu".
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
