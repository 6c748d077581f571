"""nm_sparse_linear's CUDA paths (csrc/cuda/nm_sparse_*.cu) and the CUTLASS metadata reorder.

CPU tests (always run): the PyTorch twin of the sm80 metadata reorder against PyTorch's own
CUTLASS conversion, and emulations of the CUDA kernels' index math (the GEMV's chunking, lane
steps, meta decoding and skewed shared memory; the reorder kernel's per-element formula), so
that the parts of the kernels a CPU can check are checked here.
CUDA tests: every dispatch path against the reference, on a GPU ("cuda") and, but for the
CUTLASS tensor-core GEMMs and the fake-kernel checks, on the CUDA emulation ("emu",
tests/helpers.py) on every machine.
"""
import json
import math
import pathlib
import warnings

import pytest
import torch

from leanformer.ops import nm_sparse_linear
from leanformer.reference.nm_sparse_linear import nm_sparse_linear as nm_sparse_linear_reference
from leanformer.sparse import NMSparseMatrix, meta_bits
from leanformer.sparse.cutlass_meta import reorder_meta_sm80, reorder_offsets_sm80
from tests.helpers import GPU_DEVICES, assert_close

semi = pytest.importorskip("torch.sparse._semi_structured_conversions")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = pytest.mark.parametrize("device", GPU_DEVICES)  # a GPU, or the CUDA emulation

# Mirrors of the kernel constants (csrc/cuda/nm_sparse_linear_cuda.cu).
MAX_GEMV_TOKENS = 8
GEMV_SMEM_BYTES = 40 * 1024
CHUNK_ALIGN = 128
COMPILED_PATTERNS = {(2, 4), (1, 4)}


def on_device(s, device):
    """s with values and meta on `device` (NMSparseMatrix.to parses devices torch knows, not "emu")."""
    return NMSparseMatrix(s.values.to(device), s.meta.to(device), s.n, s.m, s.shape)


def exact_24(rows, K, dtype, device="cpu", generator=None):
    """A [rows, K] matrix with exactly two non-zeros in every group of four."""
    keep = torch.rand(rows, K // 4, 4, generator=generator).argsort(-1)[..., :2]
    mask = torch.zeros(rows, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(rows, K)
    w = torch.randn(rows, K, generator=generator)
    w = torch.where(w.abs() < 0.1, torch.full_like(w, 0.5), w)  # no accidental zeros
    return (w * mask).to(dtype).to(device)


# ---- CPU: the metadata reorder twin against PyTorch's CUTLASS conversion ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,K", [(32, 32), (32, 64), (64, 128), (96, 96), (128, 512)])
def test_reorder_twin_equals_torch_conversion(dtype, rows, K):
    dense = exact_24(rows, K, dtype)
    torch_values, torch_meta = semi.sparse_semi_structured_from_dense_cutlass(dense)
    s = NMSparseMatrix.from_dense(dense, 2, 4)
    assert torch.equal(s.values, torch_values)  # same value order as CUTLASS's compressed A
    assert torch.equal(reorder_meta_sm80(s.meta, K), torch_meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reorder_twin_with_padded_groups_decodes_to_the_dense_matrix(dtype):
    # Groups with 0 or 1 non-zeros are padded differently by us (smallest unused columns) and
    # by torch; both are valid hardware metadata, so compare what CUTLASS's layout decodes to.
    rows, K = 64, 128
    dense = exact_24(rows, K, dtype)
    dense[:, :4] = 0
    dense[::3, 8:12] = 0
    dense[1::2, 16:20] *= torch.tensor([0, 0, 1, 0], dtype=dtype)
    s = NMSparseMatrix.from_dense(dense, 2, 4)
    decoded = semi.sparse_semi_structured_to_dense_cutlass(s.values, reorder_meta_sm80(s.meta, K))
    assert torch.equal(decoded, dense)


@pytest.mark.parametrize("rows,K,message", [(48, 64, "rows"), (32, 48, "K"), (32, 16, "K")])
def test_reorder_twin_rejects_shapes_cutlass_cannot_take(rows, K, message):
    meta = torch.zeros(rows, (K + 31) // 32, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        reorder_meta_sm80(meta, K)


def test_reorder_kernel_formula_equals_twin():
    """reorder_meta_sm80_kernel's per-element index math, ported line by line."""
    rows, cols = 64, 6
    twin = reorder_offsets_sm80(rows, cols)
    for r in range(rows):
        for c in range(cols):
            dst_r = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
            shift = 1 if (dst_r % 2 == 0 and c % 2 == 1) else (-1 if (dst_r % 2 == 1 and c % 2 == 0) else 0)
            dst_r += shift
            dst_c = c - shift
            assert dst_c // 2 * (rows * 2) + dst_r * 2 + dst_c % 2 == twin[r, c]
    assert sorted(twin.flatten().tolist()) == list(range(rows * cols))  # a permutation


# ---- CPU: emulation of nm_gemv_kernel's traversal ----

def gemv_chunk(K, kT):
    fit = (GEMV_SMEM_BYTES // 4 // kT) * 32 // 33 // CHUNK_ALIGN * CHUNK_ALIGN
    k_up = (K + CHUNK_ALIGN - 1) // CHUNK_ALIGN * CHUNK_ALIGN
    return max(CHUNK_ALIGN, min(fit, k_up))


def padded_tokens(T):
    return 1 if T <= 1 else 2 if T <= 2 else 4 if T <= 4 else 8


def decode_columns(word, shift, j0, n, m, c0, compiled):
    bits = meta_bits(m)
    if compiled:
        base = j0 // n * m - c0
        return [base + (e // n) * m + ((word >> (shift + e * bits)) & ((1 << bits) - 1)) for e in range(8)]
    g, t = divmod(j0, n)
    base, cols = g * m - c0, []
    for e in range(8):
        cols.append(base + ((word >> (shift + e * bits)) & ((1 << bits) - 1)))
        t += 1
        if t == n:
            t, base = 0, base + m
    return cols


def emulate_gemv(x, values, meta, n, m, grad_y=None):
    """nm_gemv_kernel step by step (forward, or grad_values when grad_y is given), asserting
    every shared-memory and meta index it forms is in bounds."""
    T, K = x.shape
    rows, kc = values.shape
    kT, chunk = padded_tokens(T), gemv_chunk(K, padded_tokens(T))
    pitch = chunk + chunk // 32
    smem_bytes = 4 * kT * pitch
    assert smem_bytes <= GEMV_SMEM_BYTES
    compiled = (n, m) in COMPILED_PATTERNS and kc % 8 == 0
    bits = meta_bits(m)
    words = meta.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(T, rows, dtype=torch.float64) if grad_y is None else torch.zeros(rows, kc, dtype=torch.float64)
    for row in range(rows):
        acc = [0.0] * kT if grad_y is None else [float(grad_y[t, row]) if t < T else 0.0 for t in range(kT)]
        for c0 in range(0, K, chunk):
            width = min(chunk, K - c0)
            assert width % m == 0
            xs = [0.0] * (kT * pitch)
            for t in range(T):
                for c in range(width):
                    xs[t * pitch + c + (c >> 5)] = float(x[t, c0 + c])
            v0, v1 = c0 // m * n, (c0 + width) // m * n
            for lane in range(32):
                for j0 in range(v0 + lane * 8, v1, 256):
                    count = min(8, v1 - j0)
                    assert not compiled or count == 8
                    bitpos = j0 * bits
                    shift = bitpos & 31
                    assert shift + 8 * bits <= 32 or count * bits + shift <= 32
                    word = int(words[row, bitpos >> 5])
                    cols = decode_columns(word, shift, j0, n, m, c0, compiled)
                    for e in range(8 if compiled else count):
                        assert 0 <= cols[e] < width, (row, c0, j0, e, cols[e])
                        idx = cols[e] + (cols[e] >> 5)
                        assert idx < pitch
                        if grad_y is None:
                            for t in range(kT):
                                acc[t] += float(values[row, j0 + e]) * xs[t * pitch + idx]
                        else:
                            out[row, j0 + e] = sum(acc[t] * xs[t * pitch + idx] for t in range(kT))
        if grad_y is None:
            for t in range(T):
                out[t, row] = acc[t]
    return out


@pytest.mark.parametrize("n,m,T,K", [
    (2, 4, 1, 64), (2, 4, 3, 1280), (1, 4, 8, 1280), (2, 8, 2, 136), (4, 8, 5, 96),
    (1, 2, 1, 70), (3, 16, 4, 160), (2, 4, 1, 12), (1, 16, 6, 1296)])
def test_gemv_index_emulation_matches_reference(n, m, T, K):
    """Multi-chunk K (chunk = 1152 at 8 tokens), row tails that are not a whole lane step
    (K = 12 at 2:4: 6 values), every meta width (1, 2, 4 bits), compiled and generic patterns."""
    rows = 5
    g = torch.Generator().manual_seed(n * 100 + m + K)
    s = NMSparseMatrix.prune(torch.randn(rows, K, generator=g, dtype=torch.float64), n, m)
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    ref = nm_sparse_linear_reference(x, s.values, s.meta, n=n, m=m)
    torch.testing.assert_close(emulate_gemv(x, s.values, s.meta, n, m), ref)
    grad_y = torch.randn(T, rows, generator=g, dtype=torch.float64)
    values = s.values.clone().requires_grad_()
    nm_sparse_linear_reference(x, values, s.meta, n=n, m=m).backward(grad_y)
    torch.testing.assert_close(emulate_gemv(x, s.values, s.meta, n, m, grad_y=grad_y), values.grad)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_gemv_shared_memory_gathers_are_bank_conflict_free(n, m):
    """With the one-float-per-32 skew, the 32 lanes' gathers of one value slot e hit distinct
    banks for the benchmarked patterns (worst case: every group keeps its first column)."""
    j_step = 8
    for e in range(8):
        banks = set()
        for lane in range(32):
            j = lane * j_step + e
            col = j // n * m
            banks.add((col + (col >> 5)) % 32)
        assert len(banks) == 32, (n, m, e, sorted(banks))


# ---- CUDA: every dispatch path against the reference ----

# The reference runs in fp32 too: both sides round sums of up to ~1200 products in fp32.
SCALE = {torch.float32: 5}


def reference_in_fp32(x, s, bias, n, m):
    return nm_sparse_linear_reference(x.float(), s.values.float(), s.meta, None if bias is None else bias.float(),
                                      n=n, m=m)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8), (3, 16)])
@pytest.mark.parametrize("tokens", range(1, MAX_GEMV_TOKENS + 1))
def test_gemv_path_matches_reference(dtype, n, m, tokens, device):
    rows, K = 37, 2320  # odd rows; K spans three chunks at 8 tokens
    s = on_device(NMSparseMatrix.prune(torch.randn(rows, K), n, m), device).to(dtype)
    x = torch.randn(tokens, K, device=device, dtype=dtype)
    bias = torch.randn(rows, device=device, dtype=dtype)
    assert_close(nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=m), reference_in_fp32(x, s, bias, n, m), dtype,
                 scale=SCALE)
    assert_close(nm_sparse_linear(x, s.values, s.meta, n=n, m=m), reference_in_fp32(x, s, None, n, m), dtype,
                 scale=SCALE)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_generic_path_for_unaligned_2_4_rows(dtype, device):
    # K = 20: 10 values per row, not a whole 16-byte step, so the generic kernel runs.
    s = on_device(NMSparseMatrix.prune(torch.randn(33, 20), 2, 4), device).to(dtype)
    x = torch.randn(2, 3, 20, device=device, dtype=dtype)
    assert_close(nm_sparse_linear(x, s.values, s.meta, n=2, m=4), reference_in_fp32(x, s, None, 2, 4), dtype,
                 scale=SCALE)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(1, 4), (2, 8)])
def test_decompress_cublas_path_matches_reference_and_warns(dtype, n, m, device):
    s = on_device(NMSparseMatrix.prune(torch.randn(45, 96), n, m), device).to(dtype)
    x = torch.randn(2, 20, 96, device=device, dtype=dtype)
    bias = torch.randn(45, device=device, dtype=dtype)
    if device == "emu":
        # The emulation library's C++ warnings go to stderr, not to Python's warnings (not yet
        # understood; the path and its result are still checked here).
        y = nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=m)
        assert_close(y, reference_in_fp32(x, s, bias, n, m), dtype, scale=SCALE)
        return
    torch.set_warn_always(True)
    try:
        with pytest.warns(UserWarning, match="decompress \\+ cuBLAS"):
            y = nm_sparse_linear(x, s.values, s.meta, bias, n=n, m=m)
    finally:
        torch.set_warn_always(False)
    assert_close(y, reference_in_fp32(x, s, bias, n, m), dtype, scale=SCALE)


def cutlass_case(dtype, rows, K, tokens, bias=True):
    s = NMSparseMatrix.prune(torch.randn(rows, K), 2, 4).to("cuda").to(dtype)
    x = torch.randn(tokens, K, device="cuda", dtype=dtype)
    b = torch.randn(rows, device="cuda", dtype=dtype) if bias else None
    return s, x, b


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,K,tokens,bias", [
    (256, 512, 64, True), (96, 128, 9, False), (1024, 2048, 300, True), (4096, 4096, 512, False)])
def test_cutlass_2_4_path_matches_reference_without_a_fallback_warning(dtype, rows, K, tokens, bias):
    """The sm80 kernel on 8.x, the sm90a kernel on 9.x (from the same call)."""
    s, x, b = cutlass_case(dtype, rows, K, tokens, bias)
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn
            y = nm_sparse_linear(x, s.values, s.meta, b, n=2, m=4)
    finally:
        torch.set_warn_always(False)
    assert_close(y, reference_in_fp32(x, s, b, 2, 4), dtype, scale=SCALE)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_2_4_with_padded_groups(dtype):
    s, x, b = cutlass_case(dtype, 64, 256, 32)
    dense = s.to_dense()
    dense[:, :8] = 0  # empty groups: padded with explicit zeros at columns 0, 1
    dense[::2, 8:12] *= torch.tensor([0, 1, 0, 0], device="cuda", dtype=dtype)
    s = NMSparseMatrix.from_dense(dense, 2, 4)
    assert_close(nm_sparse_linear(x, s.values, s.meta, b, n=2, m=4), reference_in_fp32(x, s, b, 2, 4), dtype,
                 scale=SCALE)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_cached_operands_follow_in_place_updates(dtype):
    """The prepared metadata / compressed weight is cached per (values, meta): an in-place
    update of either must be seen by the next call."""
    s, x, b = cutlass_case(dtype, 128, 256, 40)
    values, meta = s.values.clone(), s.meta.clone()
    y0 = nm_sparse_linear(x, values, meta, b, n=2, m=4)
    values.mul_(-2)
    assert_close(nm_sparse_linear(x, values, meta, b, n=2, m=4),
                 nm_sparse_linear_reference(x.float(), values.float(), meta, b.float(), n=2, m=4), dtype, scale=SCALE)
    other = NMSparseMatrix.prune(torch.randn(128, 256), 2, 4).to("cuda").to(dtype)
    meta.copy_(other.meta)
    assert_close(nm_sparse_linear(x, values, meta, b, n=2, m=4),
                 nm_sparse_linear_reference(x.float(), values.float(), meta, b.float(), n=2, m=4), dtype, scale=SCALE)
    assert not torch.equal(y0, nm_sparse_linear(x, values, meta, b, n=2, m=4))


@cuda
def test_cutlass_twin_on_cuda_equals_torch_conversion():
    dense = exact_24(128, 256, torch.bfloat16, "cuda")
    s = NMSparseMatrix.from_dense(dense, 2, 4)
    assert torch.equal(reorder_meta_sm80(s.meta, 256), semi.sparse_semi_structured_from_dense_cutlass(dense)[1])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_backward_matches_reference_and_is_deterministic(dtype, tokens, n, m, device):
    """grad_values: the gather-dot GEMV mode at <= 8 tokens, dense grad + gather above."""
    rows, K = 29, 1312
    s = on_device(NMSparseMatrix.prune(torch.randn(rows, K), n, m), device).to(dtype)
    x = torch.randn(tokens, K, device=device, dtype=dtype, requires_grad=True)
    values = s.values.clone().requires_grad_()
    grad_y = torch.randn(tokens, rows, device=device, dtype=dtype)
    gx, gv = torch.autograd.grad(nm_sparse_linear(x, values, s.meta, n=n, m=m), (x, values), grad_y)
    xr = x.detach().float().requires_grad_()
    vr = values.detach().float().requires_grad_()
    gxr, gvr = torch.autograd.grad(nm_sparse_linear_reference(xr, vr, s.meta, n=n, m=m), (xr, vr), grad_y.float())
    assert_close(gx, gxr, dtype, scale=SCALE)
    assert_close(gv, gvr, dtype, scale=SCALE)
    gx2, gv2 = torch.autograd.grad(nm_sparse_linear(x, values, s.meta, n=n, m=m), (x, values), grad_y)
    assert torch.equal(gx, gx2) and torch.equal(gv, gv2)


@gpu
@pytest.mark.parametrize("tokens", [2, 12])
def test_gradcheck_fp64_cuda(tokens, device):
    s = on_device(NMSparseMatrix.prune(torch.randn(6, 16, dtype=torch.float64), 2, 4), device)
    x = torch.randn(tokens, 16, device=device, dtype=torch.float64, requires_grad=True)
    values = s.values.clone().requires_grad_()
    bias = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: nm_sparse_linear(x, v, s.meta, b, n=2, m=4), (x, values, bias))


@cuda
@pytest.mark.parametrize("tokens,dtype", [(4, torch.float32), (64, torch.float16), (64, torch.float32)])
def test_opcheck_cuda(tokens, dtype):
    s = NMSparseMatrix.prune(torch.randn(64, 128), 2, 4).to("cuda").to(dtype)
    x = torch.randn(tokens, 128, device="cuda", dtype=dtype, requires_grad=True)
    values = s.values.clone().requires_grad_()
    torch.library.opcheck(torch.ops.leanformer.nm_sparse_linear, (x, values, s.meta, None), {"n": 2, "m": 4})


@cuda
def test_compile_fullgraph_cuda():
    s = NMSparseMatrix.prune(torch.randn(64, 128), 2, 4).to("cuda").to(torch.bfloat16)
    x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda x: nm_sparse_linear(x, s.values, s.meta, n=2, m=4), fullgraph=True)
    torch.testing.assert_close(fn(x), nm_sparse_linear(x, s.values, s.meta, n=2, m=4))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nonfinite_inputs_propagate_as_in_the_dense_reference_on_cuda(n, m, dtype, device):
    """As on the CPU (tests/ops/test_nm_sparse_linear.py): a non-finite x[t, c] (grad_y[t, r])
    reaches every output of token t as the dense x @ S^T (grad_y @ S) does, on every path: the
    GEMV (<= 8 tokens), CUTLASS's sparse tensor cores (2:4 fp16/bf16, rows % 32 == 0, K % 64 == 0)
    and decompress + cuBLAS (on emu: the GEMV and decompress + GEMM)."""
    from tests.ops.test_nm_sparse_linear import assert_same_nonfinite, nonfinite_case, reference_grads

    for tokens in (1, 5, 8, 9, 64):
        x, s, b, grad_y = nonfinite_case(n, m, tokens, dtype, device, rows=64, K=128)
        y_ref, gx_ref, gv_ref, _ = reference_grads(x, s, b, grad_y)
        what = f"{n}:{m} {dtype} tokens={tokens}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = nm_sparse_linear(x, s.values, s.meta, b, n=n, m=m)
            gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=n, m=m,
                                                                    output_mask=[True, True])
        assert_same_nonfinite(y, y_ref, dtype, "y " + what)
        assert_same_nonfinite(gx, gx_ref, dtype, "grad_x " + what)
        assert_same_nonfinite(gv, gv_ref, dtype, "grad_values " + what)


@gpu
def test_bad_inputs_name_the_argument_on_cuda(device):
    s = on_device(NMSparseMatrix.prune(torch.randn(8, 16), 2, 4), device)
    x = torch.randn(2, 16, device=device)
    with pytest.raises(RuntimeError, match="meta"):
        nm_sparse_linear(x, s.values, s.meta[:, :0], n=2, m=4)
    with pytest.raises(RuntimeError, match="values"):
        nm_sparse_linear(x, s.values.half(), s.meta, n=2, m=4)
    if device == "cuda":  # two device types
        with pytest.raises(RuntimeError, match="is on"):
            nm_sparse_linear(x, s.values.cpu(), s.meta, n=2, m=4)


def test_constants_match_the_kernel_source():
    """The emulation above is only worth something while it mirrors the kernel."""
    cuda_dir = pathlib.Path(__file__).parents[2] / "csrc" / "cuda"
    src = "".join((cuda_dir / f"nm_sparse_linear_{part}").read_text() for part in ("kernels.cuh", "cuda.cu"))
    assert f"kMaxGemvTokens = {MAX_GEMV_TOKENS};" in src
    assert "kGemvSmemBytes = 40 * 1024;" in src
    assert f"kChunkAlign = {CHUNK_ALIGN};" in src
    assert "n == 2 && m == 4) kernel = nm_gemv_kernel<scalar_t, kT, 2, 4" in src
    assert "n == 1 && m == 4) kernel = nm_gemv_kernel<scalar_t, kT, 1, 4" in src
    assert math.isclose(GEMV_SMEM_BYTES / 1024, 40)


@gpu
@pytest.mark.parametrize("tokens", [0, 3, 20])
@pytest.mark.parametrize("rows,K", [(0, 64), (32, 0), (5, 0)])
def test_empty_shapes_on_cuda(tokens, rows, K, device):
    values = torch.zeros(rows, K // 2, device=device, dtype=torch.float16)
    meta = torch.zeros(rows, (K // 2 * 2 + 31) // 32, device=device, dtype=torch.int32)
    bias = torch.randn(rows, device=device, dtype=torch.float16)
    x = torch.randn(tokens, K, device=device, dtype=torch.float16)
    y = nm_sparse_linear(x, values, meta, bias, n=2, m=4)
    assert y.shape == (tokens, rows)
    torch.testing.assert_close(y, bias.expand(tokens, rows))


# ---- the GPU-only benchmark cases (bench/bench_nm_sparse_linear.py::test_nm_sparse_linear_cuda) ----

def run_suite(device, out):
    """`leanformer bench --quick` on the GPU-only cases, in a subprocess (it runs pytest)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "leanformer.cli", "bench", "--quick", "--device", device,
                           "--suite", "nm_sparse_linear", "--out", str(out), "-k", "test_nm_sparse_linear_cuda",
                           "-rs"], capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_suite_has_no_cases_off_the_gpu(tmp_path):
    assert "cuda-only cases" in run_suite("cpu", tmp_path)
    assert not list(tmp_path.glob("*.json"))


@cuda
def test_bench_suite_quick_runs_on_the_gpu(tmp_path):
    run_suite("cuda", tmp_path)
    (report,) = tmp_path.glob("nm_sparse_linear-quick-cuda-*.json")
    rows = json.loads(report.read_text())["leanformer"]["ratios"]
    assert {r["op"] for r in rows} == {"nm_sparse_gemm", "nm_sparse_gemv"}
    assert all(r["leanformer_ms"] and r["leanformer_ms"] > 0 for r in rows), rows
