"""Linear with a prepacked weight, for the few rows of a decoding step (CPU).

At one token, or a token tree of a few dozen, ``F.linear`` on the CPU spends much of its time
repacking the weight inside the BLAS call. ``torch.ops.leanformer.packed_linear`` reads W
from a layout packed once, ``[ceil(N/32), K, 32]`` (32-column panels of W^T, zero past N), and
runs register-tiled panels over the rows; its fake kernel for torch.compile and export (of CPU
tensors) is the C++ Meta kernel of csrc/packed_linear_meta.cpp, which runs the CPU kernel's
argument checks. This file gives it the packing, a typed wrapper and autograd (w.r.t. x, the
packed weight and bias).
:func:`leanformer.nn.packed_linears` swaps it into a model's ``nn.Linear`` layers for decoding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.leanformer
PANEL = 32


def pack_linear_weight(weight: Tensor) -> Tensor:
    """``weight [N, K]`` (``nn.Linear.weight``) -> ``[ceil(N/32), K, 32]``: panel p, row k, lane j
    holds ``weight[32p + j, k]``, zero past N. A copy; differentiable."""
    if weight.dim() != 2:
        raise ValueError(f"pack_linear_weight: weight must be [out_features, in_features], got {tuple(weight.shape)}")
    N, K = weight.shape
    NP = -(-N // PANEL)
    w = F.pad(weight, (0, 0, 0, NP * PANEL - N))
    return w.view(NP, PANEL, K).transpose(1, 2).contiguous()


def unpack_linear_weight(packed_weight: Tensor, out_features: int) -> Tensor:
    """The inverse of :func:`pack_linear_weight`: ``[out_features, K]``."""
    NP, K, P = packed_weight.shape
    return packed_weight.transpose(1, 2).reshape(NP * P, K)[:out_features]


def packed_linear(x: Tensor, packed_weight: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """``x @ W^T + bias`` with ``W`` given as ``pack_linear_weight(W)``.

    Args:
        x: ``[..., K]``, float32 (float64 for gradcheck), on the CPU.
        packed_weight: ``[ceil(N/32), K, 32]`` from :func:`pack_linear_weight`, x's dtype.
        bias: ``[N]`` or None.
        out_features: N.

    Returns:
        ``[..., N]``, equal to ``F.linear(x, W, bias)`` up to summation order.

    Made for a few to a few dozen rows (a token tree: about 2x ``F.linear`` at 19 rows on a
    2-core AVX-512 CPU); at one row it is about as fast as MKL's GEMV, and for long prompts
    ``F.linear`` is the better call: :func:`leanformer.nn.packed_linears` runs it for 2 to 128
    rows. CPU only: on CUDA, cuBLAS reads W as it is.

    Example::

        >>> lin = torch.nn.Linear(256, 1024)
        >>> pw = pack_linear_weight(lin.weight.detach())
        >>> y = packed_linear(torch.randn(19, 256), pw, lin.bias.detach(), 1024)  # [19, 1024]
    """
    return _ops.packed_linear(x, packed_weight, bias, out_features)


def _rows(t: Tensor) -> Tensor:
    """``[..., C]`` -> ``[rows, C]`` (with -1 for rows, ambiguous when C = 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _setup(ctx, inputs, output):
    x, packed_weight, bias, out_features = inputs
    ctx.out_features, ctx.has_bias = out_features, bias is not None
    ctx.save_for_backward(x, packed_weight)


def _backward(ctx, grad_y):
    x, packed_weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ unpack_linear_weight(packed_weight, ctx.out_features)
    if ctx.needs_input_grad[1]:
        g = _rows(grad_y).t() @ _rows(x)  # [N, K]
        grad_w = pack_linear_weight(g)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = _rows(grad_y).sum(0)
    return grad_x, grad_w, grad_b, None


torch.library.register_autograd("leanformer::packed_linear", _backward, setup_context=_setup)


def pack_swiglu_weight(gate_weight: Tensor, up_weight: Tensor) -> Tensor:
    """Gate and up weights ``[hidden, K]`` (a SwiGLU's, no bias) -> ``[ceil(hidden/32), 2, K, 32]``:
    each 32-column panel of the gate next to the up's. A copy; differentiable."""
    if gate_weight.shape != up_weight.shape or gate_weight.dim() != 2:
        raise ValueError(f"pack_swiglu_weight: gate_weight and up_weight must both be [hidden, K], got "
                         f"{tuple(gate_weight.shape)} and {tuple(up_weight.shape)}")
    return torch.stack([pack_linear_weight(gate_weight), pack_linear_weight(up_weight)], dim=1)


def packed_swiglu(x: Tensor, packed_gate_up: Tensor, hidden: int) -> Tensor:
    """``silu(x @ Wg^T) * (x @ Wu^T)`` (a SwiGLU MLP before its down projection) in one pass.

    Args:
        x: ``[..., K]``, float32 (float64 for gradcheck), on the CPU.
        packed_gate_up: ``pack_swiglu_weight(Wg, Wu)``, ``[ceil(hidden/32), 2, K, 32]``.
        hidden: the gate's and up's output width.

    Returns:
        ``[..., hidden]``. Both products, the silu and the product accumulate in registers:
        four ops (two linears, silu, mul) become one, with no ``[rows, hidden]`` intermediates.

    Example::

        >>> pw = pack_swiglu_weight(mlp.gate.weight.detach(), mlp.up.weight.detach())
        >>> y = mlp.down(packed_swiglu(x, pw, mlp.gate.out_features))
    """
    return _ops.packed_swiglu(x, packed_gate_up, hidden)


def _swiglu_setup(ctx, inputs, output):
    x, packed, hidden = inputs
    ctx.hidden = hidden
    ctx.save_for_backward(x, packed)


def _swiglu_backward(ctx, grad_y):
    x, packed = ctx.saved_tensors
    wg, wu = (unpack_linear_weight(packed[:, i], ctx.hidden) for i in (0, 1))
    g, u = F.linear(x, wg), F.linear(x, wu)
    sig = torch.sigmoid(g)
    grad_u = grad_y * g * sig
    grad_g = grad_y * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg
    grad_x = grad_p = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_g @ wg + grad_u @ wu
    if ctx.needs_input_grad[1]:
        x2 = _rows(x)
        grad_p = pack_swiglu_weight(_rows(grad_g).t() @ x2, _rows(grad_u).t() @ x2)
    return grad_x, grad_p, None


torch.library.register_autograd("leanformer::packed_swiglu", _swiglu_backward, setup_context=_swiglu_setup)
