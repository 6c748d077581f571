"""nm_sparse_linear and its backward against the unpack + dense-matmul reference: odd shapes,
every pattern and dtype, gradcheck, opcheck, torch.compile and bad inputs."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from leanformer.ops import dense_min_tokens, nm_sparse_linear
from leanformer.reference.nm_sparse_linear import nm_sparse_linear as nm_sparse_linear_reference
from leanformer.sparse import NMSparseMatrix, unpack_meta
from leanformer.sparse.nm_format import columns
from tests.helpers import DEVICES, assert_close, assert_compiles_like_eager, opcheck_each, skip_on_emu

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2), (3, 16)]
# Every dtype the CPU kernels take; fp16 is a CUDA dtype elsewhere in the repo, but the N:M
# kernels read it on the CPU too.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(d, dt) for d in DEVICES for dt in DTYPES]
# Token counts: 0, one (the GEMV path), and tiles of 1, 2 and 4 vectors with partial last tiles.
TOKEN_SHAPES = [(0,), (1,), (5,), (17,), (3, 13)]
# The kernels' sums are short (K/m*n products, a few hundred at most): half the shared tolerance.
SCALE = 0.5


def k_values(m):
    """K = m, 3m and one above 100: a partial last meta word, a partial vector and, for 2:4 and
    1:4, whole meta words followed by a tail."""
    return (m, 3 * m, (104 // m + 1) * m)


def sample(rows, K, tokens, n, m, dtype, device, bias=True):
    s = NMSparseMatrix.prune(torch.randn(rows, K, device=device), n, m).to(dtype)
    x = torch.randn(*tokens, K, device=device).to(dtype)
    b = torch.randn(rows, device=device).to(dtype) if bias else None
    return x, s, b


def reference_grads(x, s, b, grad_y):
    """Forward and gradients of the reference in fp64 from the same (rounded) inputs."""
    x64 = x.double().requires_grad_(True)
    v64 = s.values.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    y = nm_sparse_linear_reference(x64, v64, s.meta, b64, n=s.n, m=s.m)
    y.backward(grad_y.double())
    return y.detach(), x64.grad, v64.grad, b64.grad if b is not None else None


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("tokens", TOKEN_SHAPES)
def test_forward_and_backward_match_reference(device, dtype, n, m, tokens):
    for rows in (1, 3, 37):
        for K in k_values(m):
            x, s, b = sample(rows, K, tokens, n, m, dtype, device, bias=rows != 3)
            xg, vg = x.clone().requires_grad_(True), s.values.clone().requires_grad_(True)
            bg = b.clone().requires_grad_(True) if b is not None else None
            y = nm_sparse_linear(xg, vg, s.meta, bg, n=n, m=m)
            grad_y = torch.randn_like(y)
            y.backward(grad_y)
            y_ref, gx_ref, gv_ref, gb_ref = reference_grads(x, s, b, grad_y)
            what = f"{n}:{m} rows={rows} K={K} tokens={tokens}"
            assert y.dtype == xg.grad.dtype == vg.grad.dtype == dtype, what
            assert b is None or bg.grad.dtype == dtype, what
            assert_close(y, y_ref, dtype, "y " + what, scale=SCALE)
            assert_close(xg.grad, gx_ref, dtype, "grad_x " + what, scale=SCALE)
            assert_close(vg.grad, gv_ref, dtype, "grad_values " + what, scale=SCALE)
            if b is not None:
                assert_close(bg.grad, gb_ref, dtype, "grad_bias " + what, scale=SCALE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_large_rows_and_many_tokens(device, n, m):
    # Several row blocks and token tiles (and, for grad_x, one tile split over threads).
    for tokens in (1, 3, 70):
        x, s, b = sample(300, 520, (tokens,), n, m, torch.float32, device)
        y = nm_sparse_linear(x, s.values, s.meta, b, n=n, m=m)
        grad_y = torch.randn_like(y)
        gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=n, m=m,
                                                                output_mask=[True, True])
        y_ref, gx_ref, gv_ref, _ = reference_grads(x, s, b, grad_y)
        assert y.dtype == gx.dtype == gv.dtype == torch.float32
        assert_close(y, y_ref, torch.float32, f"y tokens={tokens}", scale=SCALE)
        assert_close(gx, gx_ref, torch.float32, f"grad_x tokens={tokens}", scale=SCALE)
        assert_close(gv, gv_ref, torch.float32, f"grad_values tokens={tokens}", scale=SCALE)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_cpu_switches_to_dense_gemm_where_documented_and_logs_it(n, m, caplog):
    start = dense_min_tokens(n, m)
    assert (dense_min_tokens(2, 4), dense_min_tokens(1, 4)) == (64, 256)
    x, s, b = sample(21, 8 * m, (start,), n, m, torch.float32, "cpu")
    dense = s.to_dense()
    with caplog.at_level(logging.INFO, logger="leanformer.ops.nm_sparse_linear"):
        nm_sparse_linear(x[: start - 1], s.values, s.meta, b, n=n, m=m)
        caplog.clear()
        y = nm_sparse_linear(x, s.values, s.meta, b, n=n, m=m)
        assert f"{n}:{m} on the CPU: dense path ({start} tokens; dense from {start})" in caplog.text
        caplog.clear()
        nm_sparse_linear(x[: start - 1], s.values, s.meta, b, n=n, m=m)
        assert "sparse path" in caplog.text
    # Bitwise F.linear / mm of the unpacked weight: the C++ side took the dense path at the same
    # token count the wrapper logged.
    assert torch.equal(y, F.linear(x, dense, b))
    grad_y = torch.randn_like(y)
    gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=n, m=m,
                                                            output_mask=[True, True])
    assert torch.equal(gx, grad_y @ dense)
    cols = columns(unpack_meta(s.meta, n, m, 8 * m), n, m)
    assert torch.equal(gv, (grad_y.t() @ x).gather(1, cols))
    # Both sides of the switch agree with the reference, bf16 included.
    for tokens in (start - 1, start):
        xb, sb, bb = sample(21, 8 * m, (tokens,), n, m, torch.bfloat16, "cpu")
        yb = nm_sparse_linear(xb, sb.values, sb.meta, bb, n=n, m=m)
        assert yb.dtype == torch.bfloat16
        y_ref = reference_grads(xb, sb, bb, torch.zeros(tokens, 21))[0]
        assert_close(yb, y_ref, torch.bfloat16, f"bf16 N={tokens}", scale=SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_token_of_every_m4_pattern(n, dtype):
    """One token with m = 4 takes the CPU's GEMV path, which decodes the meta words of 1:4 and
    2:4 only; 3:4 (what compress.nm_prune picks at compression 1.25) must not take it (it read
    out of bounds and returned garbage)."""
    s = NMSparseMatrix.prune(torch.randn(8, 64), n, 4)
    x = torch.randn(1, 64)
    y = nm_sparse_linear(x.to(dtype), s.values.to(dtype), s.meta, n=n, m=4)
    assert_close(y, x.double() @ s.to_dense().double().T, dtype, f"{n}:4 one token", scale=SCALE)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_the_matrix_method(device):
    x, s, b = sample(11, 64, (6,), 2, 4, torch.float32, device)
    x_t = torch.randn(64, 6, device=device).t()  # a strided view
    expected = nm_sparse_linear_reference(x_t.double(), s.values.double(), s.meta, b.double(), n=2, m=4)
    for what, y in (("strided x", nm_sparse_linear(x_t, s.values, s.meta, b, n=2, m=4)),
                    ("NMSparseMatrix.linear", s.linear(x_t, b))):
        assert y.dtype == torch.float32, what
        assert_close(y, expected, torch.float32, what, scale=SCALE)


def nonfinite_case(n, m, tokens, dtype, device, rows=37, K=None):
    """x [tokens, K] and grad_y [tokens, rows] with a NaN, a +inf and a -inf in some tokens, each
    at a column (row) that some rows of S keep and others prune; the rest finite."""
    K = K or 8 * m
    x, s, b = sample(rows, K, (tokens,), n, m, dtype, device)
    grad_y = torch.randn(tokens, rows, device=device).to(dtype)
    dense = s.to_dense()
    kept_by_some = ((dense != 0).any(0) & (dense == 0).any(0)).nonzero().flatten().tolist()
    assert len(kept_by_some) >= 2, "a column kept by some rows and pruned by others"
    specials = [(0, kept_by_some[0], float("nan")), (tokens - 1, kept_by_some[-1], float("inf")),
                (tokens // 2, kept_by_some[1], -float("inf"))]
    for t, c, value in specials:
        x[t, c] = value
        grad_y[t, (c * 7) % rows] = value
    return x, s, b, grad_y


def assert_same_nonfinite(actual, expected, dtype, what):
    """NaN, +inf and -inf exactly where the reference has them; the finite values close."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: inf positions differ"
    inf = expected.isinf()
    assert torch.equal(actual[inf].double(), expected[inf]), f"{what}: inf signs differ"
    finite = expected.isfinite()
    assert_close(actual.double().where(finite, 0), expected.where(finite, 0), dtype, what, scale=SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8)])
def test_nonfinite_inputs_propagate_as_in_the_dense_reference(n, m, dtype):
    """x @ S_dense^T in IEEE arithmetic: a pruned entry is a stored 0, and 0 * inf = 0 * NaN =
    NaN, so a non-finite x[t, c] makes every output of token t non-finite (NaN where S prunes
    c). Below the dense switch the kernels skip pruned columns; the result must not depend on
    which side of it the token count is (one token: the GEMV; a few: the tiles; then dense)."""
    start = dense_min_tokens(n, m)
    for tokens in (1, 2, 5, 17, start - 1, start):
        x, s, b, grad_y = nonfinite_case(n, m, tokens, dtype, "cpu")
        y_ref, gx_ref, gv_ref, _ = reference_grads(x, s, b, grad_y)
        what = f"{n}:{m} {dtype} tokens={tokens}"
        y = nm_sparse_linear(x, s.values, s.meta, b, n=n, m=m)
        assert y.isnan().any() and y_ref[0].isnan().all(), what  # token 0: NaN in every output
        assert_same_nonfinite(y, y_ref, dtype, "y " + what)
        gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=n, m=m,
                                                                output_mask=[True, True])
        assert_same_nonfinite(gx, gx_ref, dtype, "grad_x " + what)
        assert_same_nonfinite(gv, gv_ref, dtype, "grad_values " + what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (1,), (3,), (2, 10), (70,)])
@pytest.mark.parametrize("rows,K", [(0, 16), (5, 0), (0, 0)])
def test_no_rows_or_no_columns(device, lead, rows, K):
    """y = bias (or an empty y) and zero gradients, on both sides of the dense switch; K = 0 or
    rows = 0 made x.reshape(-1, K) / grad_y.reshape(-1, rows) ambiguous and raise."""
    values = torch.zeros(rows, K // 2, device=device).requires_grad_(True)
    meta = torch.zeros(rows, (K // 2 * 2 + 31) // 32, device=device, dtype=torch.int32)
    bias = torch.randn(rows, device=device).requires_grad_(True)
    x = torch.randn(*lead, K, device=device).requires_grad_(True)
    y = nm_sparse_linear(x, values, meta, bias, n=2, m=4)
    assert y.shape == (*lead, rows)
    torch.testing.assert_close(y, bias.detach().expand(*lead, rows))
    gx, gv, gb = torch.autograd.grad(y, [x, values, bias], torch.ones_like(y))
    assert torch.all(gx == 0) and torch.all(gv == 0) and gv.shape == values.shape
    torch.testing.assert_close(gb, torch.full((rows,), float(math.prod(lead)), device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_output_mask_leaves_unrequested_gradients_empty(device):
    x, s, _ = sample(5, 16, (3,), 2, 4, torch.float32, device)
    grad_y = torch.randn(3, 5, device=device)
    gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=2, m=4,
                                                            output_mask=[False, True])
    assert gx.numel() == 0 and gv.shape == s.values.shape
    gx, gv = torch.ops.leanformer.nm_sparse_linear_backward(grad_y, x, s.values, s.meta, n=2, m=4,
                                                            output_mask=[True, False])
    assert gx.shape == x.shape and gv.numel() == 0


# ---- gradcheck, opcheck, compile ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_gradcheck(device, n, m):
    for tokens in ((1,), (2, 5)):
        x, s, b = sample(7, 4 * m, tokens, n, m, torch.float64, device)
        args = (x.requires_grad_(True), s.values.requires_grad_(True), b.requires_grad_(True))
        torch.autograd.gradcheck(lambda x, v, b: nm_sparse_linear(x, v, s.meta, b, n=n, m=m), args)


def _opcheck_samples(device):
    for dtype in (torch.float32, torch.float64):
        for tokens in ((1,), (2, 9)):
            x, s, b = sample(6, 32, tokens, 2, 4, dtype, device)
            x.requires_grad_(True)
            v = s.values.requires_grad_(True)
            b.requires_grad_(True)
            yield "nm_sparse_linear", (x, v, s.meta, b), dict(n=2, m=4)
            yield "nm_sparse_linear", (x, v, s.meta, None), dict(n=2, m=4)
            grad_y = torch.randn(*tokens, 6, dtype=dtype, device=device)
            yield ("nm_sparse_linear_backward", (grad_y, x.detach(), v.detach(), s.meta),
                   dict(n=2, m=4, output_mask=[True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    opcheck_each(_opcheck_samples(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    x, s, b = sample(24, 64, (3, 5), 2, 4, torch.float32, device)
    s2 = NMSparseMatrix.prune(torch.randn(64, 24, device=device), 1, 4)

    def f(x, v, b, v2):
        h = torch.relu(nm_sparse_linear(x, v, s.meta, b, n=2, m=4))
        return nm_sparse_linear(h, v2, s2.meta, n=1, m=4)

    args = (x.requires_grad_(True), s.values.requires_grad_(True), b.requires_grad_(True),
            s2.values.requires_grad_(True))
    assert_compiles_like_eager(f, args)


# ---- bad input: every error names the argument ----

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x, s, b = sample(5, 16, (3,), 2, 4, torch.float32, device)
    v, meta = s.values, s.meta
    backward = torch.ops.leanformer.nm_sparse_linear_backward
    cases = [
        (lambda: nm_sparse_linear(x[:, :14], v, meta, b, n=2, m=4),
         r"x.shape\[-1\] \(K = 14\) must be a multiple of m = 4"),
        (lambda: nm_sparse_linear(x, v, meta, b, n=4, m=4), "n must satisfy 1 <= n < m = 4, got n = 4"),
        (lambda: nm_sparse_linear(x, v, meta, b, n=1, m=3), "m must be one of 2, 4, 8, 16, got m = 3"),
        (lambda: nm_sparse_linear(x, v[:, :7], meta, b, n=2, m=4), r"values must be \[rows, K/m\*n\] = \[rows, 8\]"),
        (lambda: nm_sparse_linear(x, v, meta, b, n=1, m=4), r"values must be \[rows, K/m\*n\] = \[rows, 4\]"),
        (lambda: nm_sparse_linear(x, v.double(), meta, b, n=2, m=4), "values must have the dtype of x"),
        (lambda: nm_sparse_linear(x.int(), v, meta, b, n=2, m=4), "x must be float32, float16, bfloat16 or float64"),
        (lambda: nm_sparse_linear(x, v, meta.long(), b, n=2, m=4), "meta must be int32"),
        (lambda: nm_sparse_linear(x, v, meta[:4], b, n=2, m=4), r"meta must be int32 \[rows, .*\] = \[5, 1\]"),
        (lambda: nm_sparse_linear(x, v, meta, b[:4], n=2, m=4), r"bias must have shape \[rows\] = \[5\]"),
        (lambda: nm_sparse_linear(x, v, meta, b.double(), n=2, m=4), "bias must have the dtype of x"),
        (lambda: nm_sparse_linear(x[0, 0], v, meta, b, n=2, m=4), "x must be \\[..., K\\]"),
        (lambda: backward(torch.randn(3, 4, device=device), x, v, meta, n=2, m=4, output_mask=[True, True]),
         r"grad_y must be \[..., rows\] with the leading dims of x"),
        (lambda: backward(torch.randn(3, 5, device=device).double(), x, v, meta, n=2, m=4, output_mask=[True, True]),
         "grad_y must have the dtype of x"),
    ]
    if device == "cpu":  # on CUDA a corrupt index would be a device-side check
        s8 = NMSparseMatrix.prune(torch.randn(2, 16), 2, 8)
        bad = s8.meta.clone()
        bad[1, 0] |= 0x9  # in-group index 9 >= m = 8
        cases.append((lambda: nm_sparse_linear(torch.randn(2, 16), s8.values, bad, n=2, m=8),
                      "meta: row 1, word 0 holds an in-group index >= m = 8"))
    elif device == "cuda":  # emu tensors are CPU tensors: no second device there
        cases.append((lambda: nm_sparse_linear(x, v, meta.cpu(), b, n=2, m=4), "meta is on cpu but x is on cuda"))
    for fn, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()
