"""Fuzz quantized_linear (CPU): every format, x dtype and layout, row counts around the row
blocks, odd N, with and without bias, against its reference; BlockQuantizedMatrix round trips."""
import torch

from leanformer.ops import quantized_linear
from leanformer.quant import FORMATS, BlockQuantizedMatrix
from leanformer.reference import quantized_linear_reference
from tests.fuzz.fuzzing import fuzz

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@fuzz("quantized_linear")
def test_quantized_linear(case):
    fmt = case.pick("format", list(FORMATS))
    bits, sym = FORMATS[fmt]
    dtype = case.pick("dtype", DTYPES)
    rows = case.pick("rows", [(0,), (1,), (4,), (5,), (8,), (9,), (case.rng.randint(1, 70),),
                              (2, case.rng.randint(0, 9))])
    N, K = case.size("N", 70, special=(1, 15, 16, 17)), 32 * case.size("blocks", 6, lo=1)
    scale = case.pick("weight scale", [1e-3, 1.0, 30.0])
    q = BlockQuantizedMatrix.from_dense(case.randn(N, K, scale=scale), bits=bits, symmetric=sym)
    # the codes survive the round trip through their unpacked form
    assert torch.equal(BlockQuantizedMatrix.from_codes(q.codes(), q.block_scales(), None if sym else
                                                       q.mins.transpose(1, 2).reshape(-1, K // 32)[:N], bits).qweight,
                       q.qweight)
    x = case.layout("x", case.randn(*rows, K, scale=case.pick("x scale", [1e-2, 1.0, 100.0])).to(dtype))
    b = case.layout("bias", case.randn(N).to(dtype)) if case.coin("bias") else None
    y = quantized_linear(x, q, b)
    assert y.dtype == dtype and y.shape == (*rows, N)
    case.close(y, quantized_linear_reference(x, q.qweight, q.scales, q.mins, b, bits, N), dtype, "y")
