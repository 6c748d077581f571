"""The top-k sparse MLP written the way a user would in eager PyTorch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_ACT = {"relu": F.relu, "gelu": F.gelu}


def topk_activation_reference(h: Tensor, k: int, activation: str = "relu") -> Tuple[Tensor, Tensor]:
    """The k largest act(h) per row, indices ascending, ties to the lowest index.

    torch.topk does not specify which of equal values it returns, so the ranking is a stable
    descending sort: among equal values the lower index comes first (NaN sorts first, as the
    largest)."""
    a = _ACT[activation](h)
    order = torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :k]
    indices = order.sort(dim=-1).values
    return a.gather(-1, indices), indices


def sparse_down_projection_reference(values: Tensor, indices: Tensor, w_down_t: Tensor,
                                     bias: Optional[Tensor] = None) -> Tensor:
    """sum_j values[..., j] * w_down_t[indices[..., j]] (+ bias), by materializing the
    gathered rows."""
    y = (values.unsqueeze(-1) * w_down_t[indices]).sum(-2)
    return y if bias is None else y + bias


def topk_mask_dense(values: Tensor, indices: Tensor, d_ff: int) -> Tensor:
    """The dense [..., d_ff] activations: values at indices, zero elsewhere."""
    return values.new_zeros(*values.shape[:-1], d_ff).scatter(-1, indices, values)


def topk_mlp_reference(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down_t: Tensor,
                       b_down: Optional[Tensor], k: int, activation: str = "relu") -> Tensor:
    """Dense up projection, top-k masking of the activations, dense down projection."""
    h = F.linear(x, w_up, b_up)
    values, indices = topk_activation_reference(h, k, activation)
    return F.linear(topk_mask_dense(values, indices, h.shape[-1]), w_down_t.t(), b_down)


def predicted_sparse_mlp_reference(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down_t: Tensor,
                                   b_down: Optional[Tensor], indices: Tensor,
                                   activation: str = "relu") -> Tensor:
    """The MLP on the given neurons: gather their rows of w_up and w_down_t, then two batched
    products (what a user would write with index_select / einsum)."""
    h = torch.einsum("...d,...kd->...k", x, w_up[indices])
    if b_up is not None:
        h = h + b_up[indices]
    y = torch.einsum("...k,...kd->...d", _ACT[activation](h), w_down_t[indices])
    return y if b_down is None else y + b_down


def dense_mlp_reference(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down: Tensor,
                        b_down: Optional[Tensor], activation: str = "relu") -> Tensor:
    """The dense MLP (no top-k): F.linear + act + F.linear; w_down [d_model, d_ff]."""
    return F.linear(_ACT[activation](F.linear(x, w_up, b_up)), w_down, b_down)
