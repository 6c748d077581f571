"""The packed_linear family written the way a user would in eager PyTorch: unpack the panels,
then ``F.linear`` (and SwiGLU's ``silu(gate) * up``). Layouts as in
:mod:`leanformer.ops.packed_linear`."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def _unpack(panels: Tensor, out_features: int) -> Tensor:
    """``[NP, K, 32]`` panels of W^T -> ``W [out_features, K]``."""
    NP, K, P = panels.shape
    return panels.transpose(1, 2).reshape(NP * P, K)[:out_features]


def packed_linear_reference(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """``x @ W^T + bias`` with W unpacked from ``packed_weight [ceil(N/32), K, 32]``."""
    return F.linear(x, _unpack(packed_weight, out_features), bias)


def packed_swiglu_reference(x: Tensor, packed_gate_up: Tensor, hidden: int) -> Tensor:
    """``silu(x @ Wg^T) * (x @ Wu^T)`` with gate and up unpacked from
    ``packed_gate_up [ceil(hidden/32), 2, K, 32]``."""
    gate = _unpack(packed_gate_up[:, 0], hidden)
    up = _unpack(packed_gate_up[:, 1], hidden)
    return F.silu(F.linear(x, gate)) * F.linear(x, up)
