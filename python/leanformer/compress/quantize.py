"""``quantize(model, bits)``: BCT-style blockwise quantization of a trained model's Linear layers
without retraining: 4- or 8-bit codes per block of 32 inputs, each block's float16 scale (and
minimum) chosen by its reconstruction error, stored as :class:`leanformer.nn.QuantizedLinear`."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from leanformer.compress.result import CompressionResult, LayerCompression
from leanformer.compress.selection import Modules, replace_module, select_linears, value_bits
from leanformer.compress.storage import dense_bits
from leanformer.nn.quantized_linear import QuantizedLinear
from leanformer.quant.block_quantized import CLIP_GRID
from leanformer.reference.quantized_linear import BLOCK


def quantize(model: nn.Module, bits: int = 4, *, symmetric: bool = False, modules: Modules = None,
             clip_grid: Sequence[float] = CLIP_GRID) -> CompressionResult:
    """Replace the chosen Linear layers (in place) by :class:`QuantizedLinear` of ``bits`` (4 or
    8) per weight: ``symmetric=False`` stores a scale and a minimum per block (GGUF's Q4_1 at 4
    bits: 5 bits a weight), ``True`` a scale only (Q4_0 / Q8_0: 4.5 / 8.5 bits). ``modules``
    as :func:`select_linears` (default: every Linear but embeddings and heads; a layer whose
    in_features is not a multiple of 32 stays dense, with a logged warning). Returns the
    achieved compression against the dense layers (codes, scales, minima, bias) and each layer's
    relative weight error ``||W - W_q||_F / ||W||_F``."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    layers = {}
    for name, linear in select_linears(model, modules, multiple_of=BLOCK):
        layer = QuantizedLinear.from_linear(linear, bits=bits, symmetric=symmetric, clip_grid=clip_grid)
        w = linear.weight.detach().float()
        err = ((w - layer.dequantized_weight()).norm() / w.norm()).item()
        layers[name] = LayerCompression(dense_bits(linear.out_features, linear.in_features, linear.bias is not None,
                                                   value_bits(linear)),
                                        layer.storage_bits(), error=err, pattern=layer.matrix().format)
        replace_module(model, name, layer.to(linear.weight.device))
    return CompressionResult(f"quantize q{bits}", layers)
