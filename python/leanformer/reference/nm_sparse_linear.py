"""The N:M sparse linear written the way a user would in eager PyTorch: unpack, dense matmul."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from leanformer.sparse.nm_format import unpack_dense


def nm_sparse_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None, *,
                     n: int, m: int) -> Tensor:
    """``x @ S^T + bias`` with S the dense ``[rows, K]`` unpacked from values + meta
    (differentiable in x, values and bias; the pattern is fixed)."""
    return F.linear(x, unpack_dense(values, meta, n, m, x.shape[-1]), bias)
