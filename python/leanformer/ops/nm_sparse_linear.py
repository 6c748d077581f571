"""N:M semi-structured sparse linear (the sparse factor of DSFormer, Chand et al. 2023).

``y = x @ S^T + bias`` where S ``[rows, K]`` keeps at most n of every m consecutive columns
and is stored packed (see :mod:`leanformer.sparse.nm_format`): ``values [rows, K//m*n]`` and
int32 ``meta``. The kernels are torch.ops.leanformer.nm_sparse_linear and
nm_sparse_linear_backward (C++ on CPU, CUDA on GPU); they read only values + meta, which is
the memory (and at batch 1, time) saving; their fake kernels for torch.compile and export are
the C++ Meta kernels of csrc/nm_sparse_linear_meta.cpp, which run the same argument checks.
This file gives them a typed wrapper and autograd (w.r.t. x, the kept values under the fixed
pattern, and bias).

From :func:`dense_min_tokens` tokens on, the CPU kernels unpack S to dense and call the BLAS
GEMM (forward and backward), which is faster there; the wrapper logs that switch
(logger ``leanformer.ops.nm_sparse_linear``, INFO, once per change of path).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.leanformer
logger = logging.getLogger(__name__)
_last_path = {"cpu": "sparse"}


def dense_min_tokens(n: int, m: int) -> int:
    """Tokens from which the CPU op computes through a dense GEMM: ``16 (m/n)^2`` (64 for 2:4,
    256 for 1:4). The same rule as ``dense_min_tokens`` in csrc/nm_sparse_linear_cpu.cpp."""
    return 16 * m * m // (n * n)


def _log_cpu_path(x: Tensor, n: int, m: int) -> None:
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    path = "dense" if tokens >= dense_min_tokens(n, m) else "sparse"
    if path != _last_path["cpu"]:
        _last_path["cpu"] = path
        logger.info("nm_sparse_linear %d:%d on the CPU: %s path (%d tokens; dense from %d)", n, m, path,
                    tokens, dense_min_tokens(n, m))


def nm_sparse_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None, *,
                     n: int, m: int) -> Tensor:
    """``x @ S^T + bias`` for an N:M sparse ``S [rows, K]`` given packed.

    Args:
        x: ``[..., K]``, float32/bfloat16/float16 (float64 for gradcheck); K a multiple of m.
        values: ``[rows, K // m * n]`` in x's dtype: the kept entries of each group of m
            columns, ascending column order (e.g. ``NMSparseMatrix.values``).
        meta: int32 ``[rows, ceil(K//m*n * bits / 32)]``, the in-group columns, bit-packed
            (``NMSparseMatrix.meta``; bits = 1, 2, 4, 4 for m = 2, 4, 8, 16).
        bias: ``[rows]`` in x's dtype, or None.
        n, m: the pattern, ``1 <= n < m``, m in 2, 4, 8, 16.

    Returns:
        ``y [..., rows]`` in x's dtype, accumulated in fp32 (fp64 for fp64). Differentiable in
        x, values (the pattern in meta stays fixed) and bias.

    On CUDA the kernel is chosen by the number of tokens T (= x.numel() // K): T <= 8 in
    fp32/fp16/bf16 runs a GEMV kernel on values + meta (any N:M); larger T with 2:4 fp16/bf16,
    rows % 32 == 0 and K % 64 == 0 runs CUTLASS's sparse tensor-core GEMM (sm_80 and up; sm_90a
    on Hopper), its prepared metadata cached per (values, meta) tensor pair; everything else
    decompresses S to dense and calls cuBLAS, warning once where that replaces a 2:4
    tensor-core GEMM or runs a non-2:4 pattern at large T. The backward's grad_x is
    grad_y @ S through cuBLAS; grad_values is a gather-dot kernel for T <= 8, else the kept
    entries of cuBLAS's grad_y^T x. No atomics: results are deterministic.

    Example::

        >>> from leanformer.sparse import NMSparseMatrix
        >>> s = NMSparseMatrix.prune(torch.randn(4096, 4096), 2, 4)
        >>> y = nm_sparse_linear(torch.randn(1, 4096), s.values, s.meta, n=2, m=4)  # [1, 4096]

    On the CPU, from ``dense_min_tokens(n, m)`` tokens on S is unpacked and multiplied densely
    (logged); below that the kernels read only values + meta.

    Non-finite inputs propagate as in the dense product ``x @ S_dense^T`` (IEEE arithmetic, a
    pruned entry being a stored 0), whatever the path: ``0 * inf = 0 * NaN = NaN``, so an inf or
    NaN in ``x[t, c]`` makes every output of token t non-finite: NaN in the rows that prune
    column c, the IEEE sum (``+-inf`` or NaN) in the rows that keep it. The backward's grad_x
    does the same with grad_y (``grad_y @ S_dense``); grad_values is the dense gradient at the
    kept entries. The sparse kernels (CPU and CUDA) skip pruned columns, then fix up only the
    tokens that hold a non-finite value (one scan of x, nothing more for finite inputs).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        _log_cpu_path(x, n, m)
    return _ops.nm_sparse_linear(x, values, meta, bias, n=n, m=m)


# ---- autograd: the backward is itself a custom op; grad_bias is a plain sum ----

def _nm_sparse_linear_setup(ctx, inputs, keyword_only_inputs, output):
    x, values, meta, bias = inputs
    ctx.n, ctx.m = keyword_only_inputs["n"], keyword_only_inputs["m"]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, values, meta)


def _nm_sparse_linear_backward(ctx, grad_y):
    x, values, meta = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_x = grad_values = grad_bias = None
    if any(need):
        grad_x, grad_values = _ops.nm_sparse_linear_backward(grad_y, x, values, meta, n=ctx.n, m=ctx.m,
                                                             output_mask=need)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_y.reshape(math.prod(grad_y.shape[:-1]), grad_y.shape[-1]).sum(0)  # -1: ambiguous at 0 rows
    return (grad_x if need[0] else None, grad_values if need[1] else None, None, grad_bias)


torch.library.register_autograd("leanformer::nm_sparse_linear", _nm_sparse_linear_backward,
                                setup_context=_nm_sparse_linear_setup)
