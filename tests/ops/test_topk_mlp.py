"""topk_activation, sparse_down_projection and topk_mlp against the plain-PyTorch references
(nn.TopKMLP: tests/nn/test_topk_mlp.py)."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.ops import sparse_down_projection, topk_activation, topk_mlp
from leanformer.reference import (
    sparse_down_projection_reference,
    topk_activation_reference,
    topk_mlp_reference,
)
from tests.helpers import (DEVICES, assert_close, assert_compiles_like_eager, device_dtypes, grads_of, make_mlp,
                           is_gpu, opcheck_each, skip_on_emu)

CASES = device_dtypes()


# ---- topk_activation ----

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape,ks", [((1, 37), (0, 1, 5, 37)), ((5, 1000), (1, 30, 999)),
                                       ((3, 2, 1500), (0, 45, 1500)), ((4096,), (123,))])
def test_topk_activation_matches_reference(device, dtype, activation, shape, ks):
    h = (torch.randn(shape, device=device) * 2).to(dtype)
    for k in ks:
        values, indices = topk_activation(h, k, activation=activation)
        ref_values, ref_indices = topk_activation_reference(h, k, activation)
        assert values.dtype == dtype and indices.dtype == torch.long
        assert values.shape == indices.shape == (*shape[:-1], k)
        assert torch.equal(indices, ref_indices), f"k={k}"
        assert torch.equal(values, ref_values), f"k={k}"
        go = torch.randn_like(values)
        _, (grad,) = grads_of(lambda x: topk_activation(x, k, activation=activation)[0], [h], go)
        act = {"relu": F.relu, "gelu": F.gelu}[activation]
        _, (ref_grad,) = grads_of(lambda x: act(x).gather(-1, indices), [h], go)
        assert_close(grad, ref_grad, dtype, f"grad_h k={k}")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_ties_go_to_the_lowest_index(device):
    h = torch.randint(-3, 4, (7, 1100), device=device).float()  # many equal values
    h[2] = -torch.rand(1100, device=device) - 0.1                # all negative: relu ties at 0
    h[3] = 1.0                                                   # all equal
    h[4, 17] = float("nan")                                      # NaN ranks above everything
    for k in (1, 50, 600, 1099, 1100):
        for activation in ("relu", "gelu"):
            values, indices = topk_activation(h, k, activation=activation)
            ref_values, ref_indices = topk_activation_reference(h, k, activation)
            assert torch.equal(indices, ref_indices), (k, activation)
            torch.testing.assert_close(values, ref_values, equal_nan=True)
        assert torch.equal(topk_activation(h, k)[1][2], torch.arange(k, device=device))
        assert torch.equal(topk_activation(h, k)[1][3], torch.arange(k, device=device))
        assert 17 in topk_activation(h, k)[1][4].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_all_negative_rows_have_zero_relu_values_and_gradients(device):
    h = (-torch.rand(3, 50, device=device) - 0.5).requires_grad_(True)
    values, indices = topk_activation(h, 10)
    assert torch.all(values == 0) and torch.equal(indices, torch.arange(10, device=device).expand(3, 10))
    values.sum().backward()
    assert torch.all(h.grad == 0)


# ---- sparse_down_projection ----

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("lead,k,d_ff,d_model", [((1,), 7, 300, 65), ((6,), 37, 301, 130),
                                                 ((2, 35), 9, 100, 17), ((3,), 0, 50, 24),
                                                 ((2,), 50, 50, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_down_projection_matches_reference(device, dtype, lead, k, d_ff, d_model, bias):
    values = torch.randn(*lead, k, device=device).to(dtype)
    indices = torch.randint(0, d_ff, (*lead, k), device=device)  # repeats allowed: they add up
    w = torch.randn(d_ff, d_model, device=device).to(dtype)
    b = torch.randn(d_model, device=device).to(dtype) if bias else None
    go = torch.randn(*lead, d_model, device=device).to(dtype)
    fn = lambda v, w, b: sparse_down_projection(v, indices, w, b)
    ref = lambda v, w, b: sparse_down_projection_reference(v, indices, w, b)
    y, grads = grads_of(fn, [values, w, b], go)
    y_ref, ref_grads = grads_of(ref, [x.double() if x is not None else None for x in (values, w, b)],
                                go.double())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name, g, gr in zip(("grad_values", "grad_w_down_t", "grad_bias"), grads, ref_grads):
        if gr is not None:
            assert g.dtype == dtype
            assert_close(g, gr, dtype, name)


# ---- topk_mlp ----

@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("N,d_model,d_ff,ks", [((1,), 33, 130, (0, 4, 130)), ((2, 7), 48, 1100, (33, 550)),
                                               ((5,), 100, 301, (17,))])
def test_topk_mlp_matches_reference(device, dtype, activation, N, d_model, d_ff, ks):
    inputs = make_mlp(N, d_model, d_ff, dtype, device, bias=(d_ff != 301))
    go = torch.randn(*N, d_model, device=device).to(dtype)
    for k in ks:
        # Same dtype on both sides: the two up projections then round alike, so the two
        # selections agree exactly.
        y, grads = grads_of(lambda *a: topk_mlp(*a, k, activation=activation), inputs, go)
        y_ref, ref_grads = grads_of(lambda *a: topk_mlp_reference(*a, k, activation), inputs, go)
        assert y.dtype == dtype and y.shape == (*N, d_model)
        assert_close(y, y_ref, dtype, f"y k={k}")
        for name, g, gr in zip(("x", "w_up", "b_up", "w_down_t", "b_down"), grads, ref_grads):
            if gr is not None:
                assert g.dtype == dtype
                assert_close(g, gr, dtype, f"grad {name} k={k}")


@pytest.mark.parametrize("device", DEVICES)
def test_topk_mlp_with_all_neurons_is_the_dense_mlp(device):
    x, w_up, b_up, w_down_t, b_down = make_mlp((3, 5), 40, 96, torch.float32, device)
    dense = F.linear(F.relu(F.linear(x, w_up, b_up)), w_down_t.t(), b_down)
    torch.testing.assert_close(topk_mlp(x, w_up, b_up, w_down_t, b_down, 96), dense, atol=1e-5, rtol=1e-5)
    y, idx = topk_mlp(x, w_up, b_up, w_down_t, b_down, 7, return_indices=True)
    assert idx.shape == (3, 5, 7) and idx.dtype == torch.long


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 2, 12])
def test_topk_mlp_reads_a_strided_or_expanded_b_up(device, rows):
    """b_up as a slice (stride 2) and expanded (stride 0): the few-row fp32 up projection read
    its data pointer as if contiguous (wrong activations, and out of bounds when expanded)."""
    x, w_up, _, w_down_t, b_down = make_mlp((rows,), 7, 16, torch.float32, device)
    for name, b_up in (("sliced", torch.randn(32, device=device)[::2]),
                       ("expanded", torch.randn(1, device=device).expand(16))):
        dense = F.linear(F.relu(F.linear(x, w_up, b_up)), w_down_t.t(), b_down)
        torch.testing.assert_close(topk_mlp(x, w_up, b_up, w_down_t, b_down, 16), dense, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name} b_up: {m}")


# ---- gradcheck, opcheck, compile ----

def _separated(shape, device):
    """fp64 activations at least 0.05 apart and away from 0, so gradcheck's perturbations
    never change the top-k set."""
    d_ff = shape[-1]
    rows = [((torch.randperm(d_ff, device=device) - d_ff / 3) * 0.1 + 0.05) for _ in range(shape[:-1].numel())]
    return torch.stack(rows).reshape(shape).double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradcheck(device, activation):
    # CUDA's scatter-add into the weight gradients is atomic: its sum order varies by ulps (on the
    # emulation too, whose blocks run on several threads).
    gradcheck = lambda fn, args: torch.autograd.gradcheck(fn, args, nondet_tol=1e-10 if is_gpu(device) else 0.0)
    h = _separated(torch.Size((3, 23)), device).requires_grad_(True)
    gradcheck(lambda h: topk_activation(h, 5, activation=activation)[0], (h,))
    values = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    indices = torch.randint(0, 20, (4, 6), device=device)
    w = torch.randn(20, 9, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)
    gradcheck(lambda v, w, b: sparse_down_projection(v, indices, w, b), (values, w, b))
    # x = e_0 makes h = w_up[:, 0] + b_up exactly the separated values; gradcheck's small
    # perturbations keep the same neurons.
    d_model, d_ff = 6, 23
    x = torch.zeros(2, d_model, dtype=torch.float64, device=device)
    x[:, 0] = 1.0
    w_up = torch.zeros(d_ff, d_model, dtype=torch.float64, device=device)
    w_up[:, 0] = _separated(torch.Size((d_ff,)), device)
    w_up[:, 1:] = torch.randn(d_ff, d_model - 1, dtype=torch.float64, device=device) * 1e-3
    b_up = torch.zeros(d_ff, dtype=torch.float64, device=device)
    w_down_t = torch.randn(d_ff, d_model, dtype=torch.float64, device=device)
    b_down = torch.randn(d_model, dtype=torch.float64, device=device)
    args = [t.requires_grad_(True) for t in (x, w_up, b_up, w_down_t, b_down)]
    gradcheck(lambda *a: topk_mlp(*a, 7, activation=activation), args)


def _opcheck_samples(device):
    for dtype in (torch.float32, torch.float64):
        h = torch.randn(3, 40, dtype=dtype, device=device, requires_grad=True)
        yield "topk_activation", (h, 7, "relu")
        values, indices = torch.ops.leanformer.topk_activation(h.detach(), 7, "gelu")
        yield "topk_activation_backward", (torch.randn_like(values), h.detach(), indices, "gelu")
        w = torch.randn(40, 12, dtype=dtype, device=device, requires_grad=True)
        b = torch.randn(12, dtype=dtype, device=device, requires_grad=True)
        v = values.clone().requires_grad_(True)
        yield "sparse_down_projection", (v, indices, w, b)
        yield "sparse_down_projection", (v, indices, w, None)
        yield "sparse_down_projection_backward", (torch.randn(3, 12, dtype=dtype, device=device),
                                                  values, indices, w.detach(), [True, False, True])
        x = torch.randn(3, 12, dtype=dtype, device=device, requires_grad=True)
        w_up = torch.randn(40, 12, dtype=dtype, device=device, requires_grad=True)
        b_up = torch.randn(40, dtype=dtype, device=device, requires_grad=True)
        yield "topk_mlp", (x, w_up, b_up, w, b, 7, "relu")
        yield "topk_mlp", (x, w_up, None, w, None, 7, "gelu")
        _, idx, hs = torch.ops.leanformer.topk_mlp(x.detach(), w_up.detach(), None, w.detach(), None, 7, "gelu")
        yield "topk_mlp_backward", (torch.randn(3, 12, dtype=dtype, device=device), x.detach(), w_up.detach(),
                                    w.detach(), hs, idx, "gelu", [True, True, False, True, True])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    opcheck_each(_opcheck_samples(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    x, w_up, b_up, w_down_t, b_down = (t.requires_grad_(True) if t is not None else t
                                       for t in make_mlp((2, 5), 16, 64, torch.float32, device))

    def f(x, w_up, b_up, w_down_t, b_down):
        h = F.linear(x, w_up, b_up)
        v, i = topk_activation(h, 9, activation="gelu")
        return sparse_down_projection(v, i, w_down_t, b_down) + topk_mlp(x, w_up, b_up, w_down_t, b_down, 9)

    assert_compiles_like_eager(f, (x, w_up, b_up, w_down_t, b_down))


# ---- bad input: every error names the argument ----

@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x, w_up, b_up, w_down_t, b_down = make_mlp((3,), 16, 40, torch.float32, device)
    h = torch.randn(3, 40, device=device)
    v, i = topk_activation(h, 5)
    cases = [
        (lambda: topk_activation(h, -1), "k must be in \\[0, d_ff\\] = \\[0, 40\\], got -1"),
        (lambda: topk_activation(h, 41), "k must be in \\[0, d_ff\\] = \\[0, 40\\], got 41"),
        (lambda: topk_activation(h, 3, activation="silu"), "activation must be \"relu\" or \"gelu\""),
        (lambda: topk_activation(h.int(), 3), "h must be float32, float16, bfloat16 or float64"),
        (lambda: sparse_down_projection(v, i.int(), w_down_t), "indices must be int64"),
        (lambda: sparse_down_projection(v, i[:, :4], w_down_t), "indices must have the shape of values"),
        (lambda: sparse_down_projection(v, i, w_down_t[0]), "w_down_t must be \\[d_ff, d_model\\]"),
        (lambda: sparse_down_projection(v, i, w_down_t.double()), "w_down_t must have the dtype of values"),
        (lambda: sparse_down_projection(v, i, w_down_t, b_down[:3]), "bias must have shape \\[d_model\\] = \\[16\\]"),
        (lambda: sparse_down_projection(torch.randn(3, 50, device=device), torch.zeros(3, 50, dtype=torch.long, device=device), w_down_t),
         "values must have at most d_ff = 40"),
        (lambda: topk_mlp(x, w_up, b_up, w_down_t.t(), b_down, 4), "w_down_t must be \\[d_ff, d_model\\] = \\[40, 16\\]"),
        (lambda: topk_mlp(x, w_up[:, :8], b_up, w_down_t, b_down, 4), "w_up must be \\[d_ff, d_model\\] with d_model = 16"),
        (lambda: topk_mlp(x, w_up, b_up[:5], w_down_t, b_down, 4), "b_up must have shape \\[d_ff\\] = \\[40\\]"),
        (lambda: topk_mlp(x, w_up, b_up, w_down_t, b_down[:5], 4), "b_down must have shape \\[d_model\\] = \\[16\\]"),
        (lambda: topk_mlp(x, w_up.double(), b_up, w_down_t, b_down, 4), "w_up must have the dtype of x"),
        (lambda: topk_mlp(x, w_up, b_up.half(), w_down_t, b_down, 4), "b_up must have the dtype of x"),
        (lambda: topk_mlp(x, w_up, b_up, w_down_t, b_down, 41), "k must be in \\[0, d_ff\\]"),
        (lambda: topk_mlp(x, w_up, b_up, w_down_t, b_down, -2), "k must be in \\[0, d_ff\\]"),
    ]
    if device == "cpu":  # on CUDA an index out of range is a device-side assert (no host sync)
        cases += [
            (lambda: sparse_down_projection(v, i + 40, w_down_t), "indices must be in \\[0, d_ff\\) = \\[0, 40\\), got 4"),
            (lambda: sparse_down_projection(v, i - 40, w_down_t), "indices must be in \\[0, d_ff\\) = \\[0, 40\\), got -"),
        ]
    if device == "cuda":
        cases.append((lambda: topk_mlp(x, w_up.cpu(), b_up, w_down_t, b_down, 4), "w_up is on cpu but x is on cuda"))
        cases.append((lambda: sparse_down_projection(v, i.cpu(), w_down_t), "indices is on cpu but values is on cuda"))
    for fn, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()
