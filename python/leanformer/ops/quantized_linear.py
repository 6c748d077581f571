"""Linear with block-quantized weights (4- or 8-bit codes in blocks of 32, GGUF's Q4_0 / Q4_1 /
Q8_0 and an 8-bit asymmetric form): ``torch.ops.leanformer.quantized_linear`` on the packed
layout of :class:`leanformer.quant.BlockQuantizedMatrix`. Its fake kernel (torch.compile,
export) is the C++ Meta kernel of csrc/quantized_linear_meta.cpp, running the real kernels'
argument checks. Autograd: w.r.t. x (the straight-through gradient ``grad_y @ W``, W
dequantized) and bias; the codes and scales are constants."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanformer.quant import BlockQuantizedMatrix
from leanformer.reference.quantized_linear import dequantize_reference

_ops = torch.ops.leanformer


def quantized_linear(x: Tensor, qweight: BlockQuantizedMatrix, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` with ``W`` a :class:`BlockQuantizedMatrix` ``[N, K]``.

    Args:
        x: ``[..., K]``, float32, float16 or bfloat16, K a multiple of 32, on the device of
            ``qweight`` (CPU, or CUDA where built).
        qweight: the quantized weight (:meth:`BlockQuantizedMatrix.from_dense`, ``from_gguf``).
        bias: ``[N]`` in x's dtype, or None.

    Returns:
        ``[..., N]`` in x's dtype. Each row of x is rounded to int8 per block of 32 (scale
        ``max|x| / 127``, llama.cpp's Q8_0 activations) and multiplied with the codes in integers;
        against ``F.linear(x, qweight.to_dense())`` that adds a relative error of about 0.3%.
        A row's result does not depend on the other rows (exactly), so a token tree verifies
        to what plain decoding computes.

    At one token the weight's bytes set the time: 4-bit codes are ~6.4x fewer bytes than fp32.

    Example::

        >>> q = BlockQuantizedMatrix.from_dense(torch.randn(1024, 4096), bits=4)
        >>> y = quantized_linear(torch.randn(1, 4096), q)  # [1, 1024]
    """
    if not isinstance(qweight, BlockQuantizedMatrix):
        raise TypeError(f"quantized_linear: qweight must be a BlockQuantizedMatrix, got {type(qweight).__name__}")
    return _ops.quantized_linear(x, qweight.qweight, qweight.scales, qweight.mins, bias, qweight.bits,
                                 qweight.shape[0])


def _setup(ctx, inputs, output):
    x, qweight, scales, mins, bias, bits, out_features = inputs
    ctx.bits, ctx.out_features, ctx.has_bias = bits, out_features, bias is not None
    ctx.save_for_backward(qweight, scales, mins)


def _backward(ctx, grad_y):
    qweight, scales, mins = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        w = dequantize_reference(qweight, scales, mins, ctx.bits, ctx.out_features)
        grad_x = (grad_y.float() @ w).to(grad_y.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_b, None, None


torch.library.register_autograd("leanformer::quantized_linear", _backward, setup_context=_setup)
