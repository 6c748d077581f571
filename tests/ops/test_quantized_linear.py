"""quantized_linear (block-quantized 4/8-bit weights, CPU) against its reference: every format,
x dtype, odd and empty shapes, non-contiguous x; rows independent of each other bit for bit;
BlockQuantizedMatrix's packing, GGUF blocks read as they are, the blockwise quantizer;
opcheck, torch.compile, the straight-through gradient, bad inputs. (The ISAs against each
other: tests/ops/test_cpu_isa.py; the CUDA kernel: test_quantized_linear_cuda.py.)"""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leanformer.models.gguf_file import dequantize as gguf_dequantize
from leanformer.ops import quantized_linear
from leanformer.quant import FORMATS, BlockQuantizedMatrix, quantize_blocks
from leanformer.reference.quantized_linear import (pack_codes, quantize_activations_reference,
                                                   quantized_linear_reference, unpack_codes)
from tests.helpers import assert_close

ops = torch.ops.leanformer
# rows: none, one (a decoding step), each height of the AVX-512 (8) and AVX2 (4) row blocks and
# past them, a 64-node tree, a leading batch dimension
ROWS = [(0,), (1,), (2,), (3,), (5,), (8,), (9,), (19,), (64,), (2, 7)]
# (K, N): one block and a partial tile, a tile exactly, several of both
SIZES = [(32, 1), (64, 16), (96, 45), (256, 100)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def matrix(fmt, N, K, seed=0):
    bits, sym = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    return BlockQuantizedMatrix.from_dense(torch.randn(N, K, generator=g), bits=bits, symmetric=sym)


def reference(x, q, b):
    return quantized_linear_reference(x, q.qweight, q.scales, q.mins, b, q.bits, q.shape[0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("K,N", SIZES)
def test_matches_reference(fmt, dtype, rows, K, N):
    q = matrix(fmt, N, K)
    for bias in (True, False):
        b = torch.randn(N).to(dtype) if bias else None
        x = torch.randn(*rows, K).to(dtype)
        y = quantized_linear(x, q, b)
        assert y.shape == (*rows, N) and y.dtype == dtype
        # the same int8 rounding of x and integer sums: equal up to the fp32 summation order, and
        # the rounding to x's dtype
        assert_close(y, reference(x, q, b), dtype, f"{fmt} rows={rows} K={K} N={N}")


def test_close_to_the_dequantized_linear():
    # the int8 rounding of x costs ~0.3% of the output against F.linear on the dequantized weight
    q = matrix("q4_1", 256, 1024)
    x = torch.randn(7, 1024)
    y, want = quantized_linear(x, q), F.linear(x, q.to_dense())
    assert 1e-4 < ((y - want).norm() / want.norm()).item() < 1e-2


def test_rows_do_not_change_each_others_results():
    # a row's result is the same bits alone or in a 64-row tree: tree verification of a quantized
    # model agrees with its plain greedy decoding exactly
    for fmt in FORMATS:
        q, b = matrix(fmt, 100, 256), torch.randn(100)
        x = torch.randn(64, 256)
        full = quantized_linear(x, q, b)
        for i in (0, 7, 8, 33, 63):
            assert torch.equal(quantized_linear(x[i:i + 1], q, b), full[i:i + 1]), (fmt, i)
        assert torch.equal(quantized_linear(x[5:24], q, b), full[5:24]), fmt


def test_threads_do_not_change_results():
    # the tiles run on the caller and split_run's helpers (csrc/split_pool.h); a chunk a helper
    # computes, or the caller takes back from it, is the same bits
    q = matrix("q4_0", 4096, 512)  # 256 tiles
    threads = torch.get_num_threads()
    for rows in (1, 9):
        x = torch.randn(rows, 512)
        try:
            torch.set_num_threads(1)
            one = quantized_linear(x, q)
            torch.set_num_threads(2)
            for _ in range(5):
                assert torch.equal(quantized_linear(x, q), one), rows
        finally:
            torch.set_num_threads(threads)


def test_non_contiguous_and_empty():
    q = matrix("q8_0", 40, 64)
    x = torch.randn(64, 5).t()
    torch.testing.assert_close(quantized_linear(x, q), quantized_linear(x.contiguous(), q), rtol=0, atol=0)
    assert quantized_linear(torch.randn(0, 64), q).shape == (0, 40)
    # K = 0: y = bias
    empty = BlockQuantizedMatrix.from_codes(torch.zeros(40, 0, dtype=torch.uint8), torch.zeros(40, 0).half(),
                                            None, 4)
    b = torch.randn(40)
    torch.testing.assert_close(quantized_linear(torch.randn(3, 0), empty, b), b.expand(3, 40))
    # N = 0
    none = BlockQuantizedMatrix.from_codes(torch.zeros(0, 64, dtype=torch.uint8), torch.zeros(0, 2).half(), None, 8)
    assert quantized_linear(torch.randn(3, 64), none).shape == (3, 0)


def test_activation_rounding_matches_llama_cpp_rule():
    x = torch.tensor([[0.5, -1.0, 0.25, 3.0] + [0.0] * 28 + [0.0] * 32])
    xq, dx, xsum = quantize_activations_reference(x)
    assert xq[0, :4].tolist() == [21, -42, 11, 127]  # round(x * 127 / 3), half to even (10.58 -> 11)
    assert dx[0, 1] == 0 and torch.all(xq[0, 32:] == 0)  # an all-zero block: scale 0, codes 0


# ---- BlockQuantizedMatrix: layout, GGUF blocks, quantizer, state ----

def test_pack_layout():
    u = torch.randint(0, 16, (20, 64), dtype=torch.uint8)
    p = pack_codes(u, 4)
    assert p.shape == (2, 2, 256)
    # tile 1, block 1, byte 64 h + 4 j + e: u[16 + j, 32 + 4 h + e] | u[16 + j, 48 + 4 h + e] << 4
    h, j, e = 2, 3, 1
    assert p[1, 1, 64 * h + 4 * j + e] == u[16 + j, 32 + 4 * h + e] | (u[16 + j, 48 + 4 * h + e] << 4)
    assert torch.all(p[1, :, 4 * 4:64] == 0)  # rows 20..31 do not exist: zero codes
    assert torch.equal(unpack_codes(p, 4, 20), u)
    u8 = torch.randint(0, 256, (20, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(u8, 8), 8, 20), u8)


def gguf_bytes(fmt, N, K, seed=0):
    """Random GGUF blocks of a [N, K] tensor (uint8): Q4_0 (d, 16 nibble bytes), Q4_1 (d, m, 16
    bytes), Q8_0 (d, 32 int8)."""
    g = torch.Generator().manual_seed(seed)
    nb = N * K // 32
    d = (torch.rand(nb, 1, generator=g) * 0.1).half().view(torch.uint8).view(nb, 2)
    if fmt == "Q8_0":
        qs = torch.randint(-128, 128, (nb, 32), generator=g, dtype=torch.int8).view(torch.uint8)
        return torch.cat([d, qs], 1).reshape(-1)
    qs = torch.randint(0, 256, (nb, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    if fmt == "Q4_0":
        return torch.cat([d, qs], 1).reshape(-1)
    m = (-torch.rand(nb, 1, generator=g)).half().view(torch.uint8).view(nb, 2)
    return torch.cat([d, m, qs], 1).reshape(-1)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_from_gguf_reads_the_blocks_as_they_are(fmt):
    N, K = 37, 96
    raw = gguf_bytes(fmt, N, K)
    q = BlockQuantizedMatrix.from_gguf(raw, fmt, (N, K))
    assert q.format == fmt.lower() and q.shape == (N, K)
    assert torch.equal(q.to_dense(), gguf_dequantize(raw, fmt, (N, K)))  # same floats, bit for bit
    q2 = BlockQuantizedMatrix.from_gguf(raw.numpy(), fmt, (N, K))  # numpy bytes (a memory map) too
    assert torch.equal(q2.qweight, q.qweight)
    with pytest.raises(ValueError, match="do not hold"):
        BlockQuantizedMatrix.from_gguf(raw[:-1], fmt, (N, K))
    with pytest.raises(ValueError, match="Q6_K is not a block format read here"):
        BlockQuantizedMatrix.from_gguf(raw, "Q6_K", (N, K))


def test_from_gguf_on_the_real_smollm2_file():
    from leanformer.models.gguf_file import read_gguf
    from leanformer.models.pretrained import smollm2_path
    try:
        path = smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    _, tensors = read_gguf(path)
    t = tensors["blk.0.ffn_down.weight"]
    q = BlockQuantizedMatrix.from_gguf(t)
    assert q.format == t.type_name.lower()
    assert torch.equal(q.to_dense(), t.dequantize())


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_error_and_search(fmt):
    bits, sym = FORMATS[fmt]
    w = torch.randn(64, 512) * torch.rand(64, 1)
    codes, s, m = quantize_blocks(w, bits, sym)
    assert int(codes.max()) < 2 ** bits and s.dtype == torch.float16 and (m is None) == sym
    q = BlockQuantizedMatrix.from_dense(w, bits=bits, symmetric=sym)
    plain = BlockQuantizedMatrix.from_dense(w, bits=bits, symmetric=sym, clip_grid=(1.0,))
    err = ((q.to_dense() - w).norm() / w.norm()).item()
    err_plain = ((plain.to_dense() - w).norm() / w.norm()).item()
    assert err <= err_plain  # the search keeps round-to-nearest's range where nothing is better
    assert err < {4: 0.1, 8: 0.006}[bits], err
    assert q.storage_bits() == 64 * 512 // 32 * (32 * bits + (16 if sym else 32))


def test_symmetric_q4_uses_the_largest_value_signed():
    # llama.cpp's Q4_0 rule: s = -x_max / 8 for the signed value of largest magnitude, which
    # then decodes exactly (code 0)
    w = torch.linspace(-1, 2, 32)[None]
    q = BlockQuantizedMatrix.from_dense(w, bits=4, symmetric=True, clip_grid=(1.0,))
    assert q.block_scales().item() == pytest.approx(-2 / 8, rel=1e-3)
    assert q.to_dense()[0, -1].item() == pytest.approx(2.0, rel=1e-3)


def test_state_dict_round_trip():
    for fmt in FORMATS:
        q = matrix(fmt, 33, 64)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        q2 = BlockQuantizedMatrix.from_state_dict(torch.load(buf, weights_only=True))
        assert q2.format == fmt and torch.equal(q2.to_dense(), q.to_dense())


def test_matrix_checks():
    q = matrix("q4_1", 33, 64)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        BlockQuantizedMatrix(q.qweight[:, :1], q.scales, q.mins, 4, (33, 64))
    with pytest.raises(ValueError, match="scales must be float16"):
        BlockQuantizedMatrix(q.qweight, q.scales.float(), q.mins, 4, (33, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockQuantizedMatrix.from_dense(torch.randn(4, 40))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        BlockQuantizedMatrix.from_dense(torch.randn(4, 64), bits=3)
    with pytest.raises(TypeError, match="BlockQuantizedMatrix"):
        quantized_linear(torch.randn(2, 64), q.to_dense())


# ---- torch integration ----

def test_opcheck():
    for fmt in ("q4_1", "q8_0"):
        q = matrix(fmt, 45, 64)
        args = (torch.randn(5, 64), q.qweight, q.scales, q.mins, torch.randn(45), q.bits, 45)
        torch.library.opcheck(ops.quantized_linear.default, args)
        torch.library.opcheck(ops.quantized_linear.default, (*args[:4], None, q.bits, 45))


def test_compiles_fullgraph_with_straight_through_gradient():
    q = matrix("q4_0", 40, 64)
    x = torch.randn(2, 3, 64, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    f = lambda x, b: quantized_linear(x, q, b)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, b), f(x, b), rtol=0, atol=0)
    go = torch.randn(2, 3, 40)
    gx, gb = torch.autograd.grad(compiled(x, b), [x, b], go)
    torch.testing.assert_close(gx, go @ q.to_dense())  # straight through the rounding of x
    torch.testing.assert_close(gb, go.sum((0, 1)))


def test_bad_inputs_name_the_argument():
    q = matrix("q4_1", 40, 64)
    x = torch.randn(3, 64)

    def call(x=x, qweight=q.qweight, scales=q.scales, mins=q.mins, bias=None, bits=4, n=40):
        return ops.quantized_linear(x, qweight, scales, mins, bias, bits, n)

    with pytest.raises(RuntimeError, match="must be a multiple of the block size 32"):
        call(x=torch.randn(3, 48))
    with pytest.raises(RuntimeError, match=r"qweight must be \[ceil\(N/16\), K/32, 256\] = \[\*, 1, 256\]"):
        call(x=torch.randn(3, 32))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        call(bits=5)
    with pytest.raises(RuntimeError, match=r"qweight must be \[ceil\(N/16\), K/32, 512\]"):
        call(bits=8)
    with pytest.raises(RuntimeError, match="out_features = 49 does not fit qweight's 3 tiles"):
        call(n=49)
    with pytest.raises(RuntimeError, match="scales must be float16"):
        call(scales=q.scales.float())
    with pytest.raises(RuntimeError, match=r"mins must be \[ceil\(N/16\), K/32, 16\]"):
        call(mins=q.mins[:, :, :8])
    with pytest.raises(RuntimeError, match=r"bias must have shape \[out_features\] = \[40\]"):
        call(bias=torch.randn(41))
