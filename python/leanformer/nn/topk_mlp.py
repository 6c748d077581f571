"""The two-layer MLP with top-k sparse activations (Lazy Neuron Phenomenon, Li et al. 2023)."""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.ops.topk_mlp import ACTIVATIONS, topk_activation, topk_mlp

logger = logging.getLogger(__name__)

# The auto switch, as guidance for a TopKMLP(1024, 4096) in inference on a 2-core CPU (fp32),
# sparse path against dense path (both top-k): up to 8 tokens the sparse path is faster at every
# ratio up to 30% (the dense GEMM of a few rows is a GEMV per row there); from 64 tokens on it is
# faster at 3-10% of the neurons and slower from 20% (a per-token gather of k rows then costs
# more than the GEMM's share of one pass over d_ff rows). So dense is taken when a call has more
# than MAX_SPARSE_ROWS tokens AND k / hidden > MAX_SPARSE_RATIO.
MAX_SPARSE_ROWS = 8
MAX_SPARSE_RATIO = 0.15
MODES = ("auto", "sparse", "dense")


class TopKMLP(nn.Module):
    """``fc2(TopK_k(act(fc1(x))))``: a drop-in for :class:`leanformer.nn.MLP` that keeps the
    k largest activations of every token and zeroes the rest.

    Parameters are named and shaped as in ``MLP`` (``fc1``, ``fc2`` are ``nn.Linear``), so
    state dicts load either way. The fused op needs the down projection's weight transposed
    (``[hidden, dim]``, contiguous); ``fc2.weight`` keeps nn.Linear's layout and the module
    caches its contiguous transpose while no gradient is being recorded (inference), keyed by
    the weight's storage and version, so an in-place update refreshes it. With autograd on it
    transposes on every call (the copy is differentiable).

    Paths: the sparse one is :func:`leanformer.ops.topk_mlp` (dense up projection, top-k,
    sparse down projection); the dense one computes the same top-k MLP with a dense down
    projection of the zero-filled activations. ``mode="auto"`` takes the dense path when a
    call has more than ``max_sparse_rows`` tokens (rows of ``x``) and ``k / hidden >
    max_sparse_ratio``, where dense is faster on a CPU; both give the same result. Every change of path
    is logged (logger ``leanformer.nn.topk_mlp``, INFO) and ``last_path`` holds the last one.

    Args:
        dim: input and output width; hidden: fc1's output width (d_ff).
        k: activations kept per token, ``0 <= k <= hidden``.
        activation: ``"relu"`` or ``"gelu"``.
        mode: ``"auto"``, ``"sparse"`` or ``"dense"``.
        max_sparse_rows, max_sparse_ratio: the auto switch (the defaults suit a CPU, see
            ``MAX_SPARSE_ROWS``; on a GPU, time both paths with the topk_mlp benchmark).
    """

    def __init__(self, dim: int, hidden: int, k: int, activation: str = "relu", bias: bool = True, *,
                 mode: str = "auto", max_sparse_rows: int = MAX_SPARSE_ROWS,
                 max_sparse_ratio: float = MAX_SPARSE_RATIO):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0 <= k <= hidden:
            raise ValueError(f"k must be in [0, hidden] = [0, {hidden}], got {k}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.k, self.activation, self.mode = k, activation, mode
        self.max_sparse_rows, self.max_sparse_ratio = max_sparse_rows, max_sparse_ratio
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.last_path: Optional[str] = None
        self._w_down_t_cache: Optional[Tuple[tuple, Tensor]] = None

    def choose_path(self, rows: int) -> Tuple[str, str]:
        """(path, reason) for a call with ``rows`` tokens."""
        if self.mode != "auto":
            return self.mode, f"mode={self.mode!r}"
        ratio = self.k / self.fc1.out_features if self.fc1.out_features else 0.0
        rows_text = f"{rows} rows {'>' if rows > self.max_sparse_rows else '<='} max_sparse_rows={self.max_sparse_rows}"
        ratio_text = (f"k/hidden = {ratio:.1%} {'>' if ratio > self.max_sparse_ratio else '<='} "
                      f"max_sparse_ratio={self.max_sparse_ratio:.0%}")
        if rows > self.max_sparse_rows and ratio > self.max_sparse_ratio:
            return "dense", f"{rows_text} and {ratio_text}"
        return "sparse", f"{rows_text}, {ratio_text}"

    def w_down_t(self) -> Tensor:
        """fc2's weight transposed and contiguous, ``[hidden, dim]``."""
        w = self.fc2.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w.t().contiguous()
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._w_down_t_cache is None or self._w_down_t_cache[0] != key:
            self._w_down_t_cache = (key, w.detach().t().contiguous())
        return self._w_down_t_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        path, reason = self.choose_path(rows)
        if path != self.last_path:
            logger.info("%s: %s path (%s)", self._name(), path, reason)
            self.last_path = path
        if path == "sparse":
            return topk_mlp(x, self.fc1.weight, self.fc1.bias, self.w_down_t(), self.fc2.bias, self.k,
                            activation=self.activation)
        h = self.fc1(x)
        if self.k == h.shape[-1]:
            return self.fc2(F.relu(h) if self.activation == "relu" else F.gelu(h))
        values, indices = topk_activation(h, self.k, activation=self.activation)
        return self.fc2(torch.zeros_like(h).scatter(-1, indices, values))

    def _name(self) -> str:
        return f"TopKMLP({self.fc1.in_features}, {self.fc1.out_features}, k={self.k})"

    def extra_repr(self) -> str:
        return (f"k={self.k}, activation={self.activation}, mode={self.mode}, "
                f"max_sparse_rows={self.max_sparse_rows}, max_sparse_ratio={self.max_sparse_ratio}")
