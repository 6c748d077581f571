"""Block-quantized weights: 4- and 8-bit codes in blocks of 32 with float16 scales (and minima),
the formats of GGUF's Q4_0 / Q4_1 / Q8_0, packed for ``leanformer.ops.quantized_linear``."""
from leanformer.quant.block_quantized import FORMATS, BlockQuantizedMatrix, quantize_blocks

__all__ = ["FORMATS", "BlockQuantizedMatrix", "quantize_blocks"]
