"""quantized_linear's CUDA kernels (csrc/cuda/quantized_linear_*), on a GPU where there is one
and in the CPU emulation ("emu") everywhere: against the reference (4 and 8 bits, symmetric or
not, every dtype of x, odd N, 0 to 33 rows, K over several chunks of 16 blocks, bias or not)
and bit for bit against the CPU kernel (the same fp32 operations in the same order); a row
alone equals it in any batch; strided and non-contiguous x; empty sizes; non-finite x as the
CPU; the argument checks on the device path."""
import pytest
import torch

from leanformer.quant import BlockQuantizedMatrix
from leanformer.reference.quantized_linear import pack_codes, pack_params, quantized_linear_reference
from tests.helpers import GPU_DEVICES, assert_close

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [(4, True), (4, False), (8, True), (8, False)]  # q4_0, q4_1, q8_0, q8_1


def weight(N, K, bits, symmetric, seed=0):
    """Packed (qweight, scales, mins): random codes over the whole range, float16 scales and minima."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2 ** bits, (N, K), generator=g).to(torch.uint8)
    s = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half()
    m = None if symmetric else (torch.randn(N, K // 32, generator=g) * 0.1).half()
    return pack_codes(u, bits), pack_params(s), None if m is None else pack_params(m)


def run(device, x, w, bias, bits, N):
    """The op on `device` (result back on the CPU) and on the CPU."""
    qw, sc, mn = w
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = torch.ops.leanformer.quantized_linear(on(x), on(qw), on(sc), on(mn), on(bias), bits, N).cpu()
    cpu = torch.ops.leanformer.quantized_linear(x, qw, sc, mn, bias, bits, N)
    return got, cpu


def assert_same_bits(got, cpu, what):
    assert got.dtype == cpu.dtype and got.shape == cpu.shape, what
    torch.testing.assert_close(got, cpu, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("bits,symmetric", FORMATS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("K", [64, 37 * 32])  # 2 blocks; 2 chunks of 16 blocks and 5 more
def test_matches_reference_and_the_cpu_kernel(device, bits, symmetric, dtype, K):
    N = 45  # 3 tiles, the last one 13 outputs
    w = weight(N, K, bits, symmetric, seed=bits + K)
    g = torch.Generator().manual_seed(K)
    for rows in (0, 1, 7, 33):
        x = torch.randn(rows, K, generator=g).to(dtype)
        for bias in (None, torch.randn(N, generator=g).to(dtype)):
            what = f"rows {rows}, bias {bias is not None}"
            got, cpu = run(device, x, w, bias, bits, N)
            assert got.shape == (rows, N) and got.dtype == dtype, what
            assert_same_bits(got, cpu, what)
            want = quantized_linear_reference(x, *w, bias, bits, N)
            assert_close(got, want, dtype, what)  # fp32 chain vs float64 sums: ~1e-7 here


@pytest.mark.parametrize("device", GPU_DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_alone_equals_it_in_any_batch(device, bits):
    N, K = 40, 20 * 32
    w = weight(N, K, bits, symmetric=bits == 8, seed=3)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    qw, sc, mn = (None if t is None else t.to(device) for t in w)
    xd = x.to(device)
    op = lambda xs: torch.ops.leanformer.quantized_linear(xs, qw, sc, mn, None, bits, N).cpu()  # noqa: E731
    whole = op(xd)
    for lo, hi in [(0, 1), (5, 6), (39, 40), (3, 20), (16, 33), (1, 40)]:  # across groups of 16 rows
        assert torch.equal(op(xd[lo:hi].contiguous()), whole[lo:hi]), (lo, hi)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_strided_and_non_contiguous_x(device):
    N, K, bits = 21, 96, 4
    w = weight(N, K, bits, symmetric=False, seed=5)
    g = torch.Generator().manual_seed(2)
    # (base, view): the view is taken on the device (a copy to the device would be contiguous)
    cases = {
        "row stride beyond K": (torch.randn(6, K + 40, generator=g), lambda t: t[:, 8:8 + K]),
        "K strided": (torch.randn(5, 2 * K, generator=g), lambda t: t[:, ::2]),
        "leading dims permuted": (torch.randn(3, 4, K, generator=g), lambda t: t.transpose(0, 1)),
        "a single row of a column": (torch.randn(K, 3, generator=g), lambda t: t[:, 1][None]),
    }
    qw, sc, mn = (t.to(device) for t in w)
    for what, (base, view) in cases.items():
        x, xd = view(base), view(base.to(device))
        assert not xd.is_contiguous() and xd.stride() == x.stride(), what
        got = torch.ops.leanformer.quantized_linear(xd, qw, sc, mn, None, bits, N).cpu()
        cpu = torch.ops.leanformer.quantized_linear(x, *w, None, bits, N)
        assert got.shape == (*x.shape[:-1], N), what
        assert_same_bits(got, cpu, what)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_qweight_off_word_alignment(device):
    """Codes whose data starts at an odd byte (a view into a larger buffer) are read right: the
    launcher copies them (4-byte loads; a misaligned load faults on a GPU, not in the emulation)."""
    N, K, bits = 20, 64, 8
    qw, sc, mn = weight(N, K, bits, symmetric=True, seed=8)
    x = torch.randn(3, K)
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), qw.flatten()]).to(device)
    qd = buf[1:].view(qw.shape)
    assert qd.data_ptr() % 4 == 1
    got = torch.ops.leanformer.quantized_linear(x.to(device), qd, sc.to(device), None, None, bits, N).cpu()
    assert_same_bits(got, torch.ops.leanformer.quantized_linear(x, qw, sc, None, None, bits, N), "offset qweight")


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_empty_and_edge_sizes(device):
    g = torch.Generator().manual_seed(4)
    for N, K, lead, bits in [(0, 64, (3,), 4), (16, 64, (0,), 8), (5, 0, (3,), 4), (16, 32, (2, 3), 8),
                             (1, 32, (1,), 4), (17, 32 * 17, (2,), 8)]:
        w = weight(N, K, bits, symmetric=False, seed=N + K)
        x = torch.randn(*lead, K, generator=g)
        for bias in (None, torch.randn(N, generator=g)):
            what = f"N {N}, K {K}, x {list(x.shape)}, bias {bias is not None}"
            got, cpu = run(device, x, w, bias, bits, N)
            assert got.shape == (*lead, N), what
            assert_same_bits(got, cpu, what)
            if K == 0:  # no blocks: the bias, or zeros
                assert torch.equal(got, (bias if bias is not None else torch.zeros(N)).expand(*lead, N)), what


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_rounding_ties_zero_blocks_and_non_finite_x_as_the_cpu(device):
    N, K, bits = 16, 128, 8
    w = weight(N, K, bits, symmetric=True, seed=6)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(3))
    # block 0 of row 0: max |x| = 127, so x * 127 / a = x: halves round to even (2.5 -> 2, -0.5 -> 0)
    x[0, :32] = torch.tensor([127.0, 2.5, -0.5, 1.5, -3.5, 0.5] + [0.25] * 26)
    x[1, 32:64] = 0.0  # a = 0: codes 0, dx 0
    x[2, 70] = float("nan")
    x[3, 100] = float("inf")
    got, cpu = run(device, x, w, None, bits, N)
    assert_same_bits(got, cpu, "ties, a zero block, NaN, inf")
    assert torch.isfinite(got[:3]).all()  # a NaN input is rounded to -127, its block's max ignores it
    # the tie rounding itself: against the reference with row 0's other blocks zeroed
    x0 = torch.zeros(1, K)
    x0[0, :32] = x[0, :32]
    got0, _ = run(device, x0, w, None, bits, N)
    torch.testing.assert_close(got0, quantized_linear_reference(x0, *w, None, bits, N), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_through_block_quantized_matrix(device):
    q = BlockQuantizedMatrix.from_dense(torch.randn(30, 128, generator=torch.Generator().manual_seed(7)), bits=4)
    x = torch.randn(3, 128)
    want = q.linear(x)
    got = q.to(device).linear(x.to(device)).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_bad_inputs_are_refused_on_the_device(device):
    N, K, bits = 20, 64, 4
    qw, sc, mn = weight(N, K, bits, symmetric=False)
    x = torch.randn(2, K)
    bad = [
        (dict(qweight=qw.to(torch.int8)), "qweight must be uint8"),
        (dict(scales=sc.float()), "scales must be float16"),
        (dict(mins=mn.bfloat16()), "mins must be float16"),
        (dict(x=torch.randn(2, 40)), "must be a multiple of the block size 32"),
        (dict(x=x.double()), "x must be float32, float16 or bfloat16"),
        (dict(bits=8), r"qweight must be \[ceil\(N/16\), K/32, 512\]"),
        (dict(N=33), "out_features = 33 does not fit"),
    ]
    for change, msg in bad:
        a = dict(x=x, qweight=qw, scales=sc, mins=mn, bits=bits, N=N) | change
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.leanformer.quantized_linear(a["x"].to(device), a["qweight"].to(device), a["scales"].to(device),
                                                  a["mins"].to(device), None, a["bits"], a["N"])
