"""A Linear layer whose weight is block-quantized (4- or 8-bit codes in blocks of 32, GGUF's
Q4_0 / Q4_1 / Q8_0 formats): the codes, scales and minima are buffers, read by
:func:`leanformer.ops.quantized_linear` without dequantizing."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import leanformer.ops.quantized_linear  # noqa: F401  (registers the op's autograd)
from leanformer.quant import BlockQuantizedMatrix
from leanformer.quant.block_quantized import CLIP_GRID
from leanformer.reference.quantized_linear import BLOCK, TILE

_ops = torch.ops.leanformer


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W [out_features, in_features]`` a :class:`BlockQuantizedMatrix`
    (in_features a multiple of 32). ``qweight``, ``scales`` and ``mins`` (None for the symmetric
    formats) are buffers, so ``state_dict`` saves and loads the quantized form; ``bias`` is a
    Parameter in the activations' dtype. The forward rounds x to int8 per block of 32
    (:func:`leanformer.ops.quantized_linear`); its gradient w.r.t. x is the straight-through one.

    Example::

        >>> layer = QuantizedLinear.from_linear(nn.Linear(576, 1536), bits=4)  # q4_1
        >>> layer(torch.randn(3, 576)).shape
        torch.Size([3, 1536])
        >>> layer.storage_bits() / (576 * 1536 * 32 + 1536 * 32)   # ~0.16 of the fp32 layer
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 symmetric: bool = False, device=None, dtype=None):
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"QuantizedLinear: in_features = {in_features} must be a multiple of {BLOCK}")
        if bits not in (4, 8):
            raise ValueError(f"QuantizedLinear: bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        T, KB = -(-out_features // TILE), in_features // BLOCK
        self.register_buffer("qweight", torch.zeros(T, KB, TILE * BLOCK * bits // 8, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(T, KB, TILE, dtype=torch.float16, device=device))
        self.register_buffer("mins", None if symmetric else torch.zeros(T, KB, TILE, dtype=torch.float16,
                                                                         device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_matrix(cls, matrix: BlockQuantizedMatrix, bias: Optional[Tensor] = None) -> "QuantizedLinear":
        """A layer holding ``matrix`` (not copied) and ``bias``."""
        N, K = matrix.shape
        layer = cls(K, N, bias is not None, bits=matrix.bits, symmetric=matrix.symmetric, device="meta",
                    dtype=None if bias is None else bias.dtype)
        layer.qweight, layer.scales, layer.mins = matrix.qweight, matrix.scales, matrix.mins
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int = 4, symmetric: bool = False,
                    clip_grid: Sequence[float] = CLIP_GRID) -> "QuantizedLinear":
        """Quantize a trained ``nn.Linear`` blockwise (:meth:`BlockQuantizedMatrix.from_dense`)."""
        q = BlockQuantizedMatrix.from_dense(linear.weight.detach(), bits=bits, symmetric=symmetric,
                                            clip_grid=clip_grid)
        return cls.from_matrix(q, None if linear.bias is None else linear.bias.detach())

    def matrix(self) -> BlockQuantizedMatrix:
        """The weight as a :class:`BlockQuantizedMatrix` (sharing the buffers)."""
        return BlockQuantizedMatrix(self.qweight, self.scales, self.mins, self.bits,
                                    (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.matrix().to_dense(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # the op on the buffers directly: a decoding step calls a few hundred of these, and
        # building (and checking) a BlockQuantizedMatrix each time cost ~20 us a call
        # (the dicts directly: nn.Module.__getattr__ costs ~1 us a buffer)
        b = self._buffers
        return _ops.quantized_linear(x, b["qweight"], b["scales"], b["mins"], self._parameters.get("bias"), self.bits,
                                     self.out_features)

    def storage_bits(self) -> int:
        """Codes, scales, minima and the bias (in its dtype)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size() * 8
        return self.matrix().storage_bits() + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.matrix().format}")
