"""K Linears of one drafter as one Linear of K x out outputs: a single GEMM where K calls (or a
batched einsum over a [K, out, in] stack, which permutes the stack every call) cost more than the
arithmetic."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from leanformer.nn.packed_linear_layers import packed_or_linear


class StackedLinears:
    """``linears`` concatenated along their outputs: ``(weight [K out, in], bias [K out])``, so
    ``F.linear(x, *stacked())`` gives ``[..., K out]`` with Linear k's output at ``k out:(k+1) out``.
    Concatenated per call while autograd needs the graph (training); at inference the copy is
    kept, which a decoding step would otherwise rebuild (K x out x in floats) every forward, and
    made again only when a weight moved or changed (an optimizer step or ``load_state_dict``
    bumps its version)."""

    def __init__(self, linears: nn.ModuleList):
        self.linears = linears
        self._key, self._stacked = None, None
        self._packed: dict = {}

    def apply(self, x: Tensor) -> Tensor:
        """``F.linear(x, *self())``; inside :func:`leanformer.nn.packed_linears`, on a packed copy,
        even for one row: Medusa drafts from the one accepted node per step, and for a K-times
        wide stack the packed kernel is faster than ``F.linear`` there, unlike for the model's
        own one-row steps."""
        return packed_or_linear(x, *self(), self._packed, min_rows=1)

    def __call__(self) -> Tuple[Tensor, Tensor]:
        params = [p for lin in self.linears for p in (lin.weight, lin.bias)]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._stack()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if key != self._key:
            with torch.no_grad():
                self._stacked = self._stack()
            self._key = key
        return self._stacked

    def _stack(self) -> Tuple[Tensor, Tensor]:
        return torch.cat([lin.weight for lin in self.linears]), torch.cat([lin.bias for lin in self.linears])
