"""predicted_sparse_mlp (the top-k MLP on given neurons) against the reference and topk_mlp
(NeuronPredictor and nn.PredictedSparseMLP: tests/nn/test_neuron_predictor.py)."""
import pytest
import torch
import torch.nn.functional as F

from leanformer.nn import NeuronPredictor
from leanformer.ops import predicted_sparse_mlp, topk_mlp
from leanformer.reference import predicted_sparse_mlp_reference
from tests.helpers import (DEVICES, assert_close, assert_compiles_like_eager, device_dtypes, grads_of, make_mlp,
                           skip_on_emu)


def random_indices(lead, k, d_ff, device, repeats=False):
    if repeats:
        return torch.randint(0, d_ff, (*lead, k), device=device)
    return torch.stack([torch.randperm(d_ff, device=device)[:k] for _ in range(int(torch.tensor(lead).prod()))]
                       ).reshape(*lead, k)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("lead,d_model,d_ff,k,repeats", [((1,), 33, 130, 4, False), ((1,), 1000, 301, 123, False),
                                                         ((3, 7), 48, 1100, 33, True), ((5,), 100, 301, 0, False),
                                                         ((9,), 65, 40, 40, False), ((2,), 17, 50, 130, True)])
def test_matches_reference(device, dtype, activation, lead, d_model, d_ff, k, repeats):
    x, w_up, b_up, w_down_t, b_down = make_mlp(lead, d_model, d_ff, dtype, device, bias=d_ff != 301)
    if k > d_ff:
        k = d_ff
    idx = random_indices(lead, k, d_ff, device, repeats)
    go = torch.randn(*lead, d_model, device=device).to(dtype)
    inputs = [x, w_up, b_up, w_down_t, b_down]
    y, grads = grads_of(lambda *a: predicted_sparse_mlp(*a, idx, activation=activation), inputs, go)
    ref_inputs = [t.double() if t is not None else None for t in inputs]
    y_ref, ref_grads = grads_of(lambda *a: predicted_sparse_mlp_reference(*a, idx, activation), ref_inputs, go.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y")
    for name, g, gr in zip(("x", "w_up", "b_up", "w_down_t", "b_down"), grads, ref_grads):
        if gr is not None:
            assert g.dtype == dtype
            assert_close(g, gr, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 3, 20])
def test_with_the_true_topk_set_it_is_the_topk_mlp(device, N):
    x, w_up, b_up, w_down_t, b_down = make_mlp((N,), 64, 512, torch.float32, device)
    y, idx = topk_mlp(x, w_up, b_up, w_down_t, b_down, 50, return_indices=True)
    torch.testing.assert_close(predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx), y, atol=1e-5, rtol=1e-5)
    # all neurons: the dense MLP; the order of the indices does not matter
    idx = torch.randperm(512, device=device).expand(N, 512)
    dense = F.linear(F.relu(F.linear(x, w_up, b_up)), w_down_t.t(), b_down)
    torch.testing.assert_close(predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx), dense, atol=1e-5, rtol=1e-5)


def test_result_does_not_depend_on_the_thread_count():
    device = "cpu"  # the CPU kernel splits rows across threads; CUDA has no thread count to vary
    x, w_up, b_up, w_down_t, b_down = make_mlp((2,), 256, 1024, torch.float32, device)
    idx = random_indices((2,), 200, 1024, device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx), y1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradcheck(device, activation):
    x, w_up, b_up, w_down_t, b_down = make_mlp((3,), 6, 23, torch.float64, device)
    idx = random_indices((3,), 5, 23, device)
    args = [t.requires_grad_(True) for t in (x, w_up, b_up, w_down_t, b_down)]
    # x . w_up + b_up away from ReLU's kink at 0 (its derivative is one-sided there)
    torch.autograd.gradcheck(lambda *a: predicted_sparse_mlp(*a, idx, activation=activation), args,
                             nondet_tol=1e-10 if device == "cuda" else 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_on_emu(device, "opcheck traces the fake kernels, not an EmuTensor")
    for dtype in (torch.float32, torch.float64):
        x, w_up, b_up, w_down_t, b_down = (t.requires_grad_(True) for t in make_mlp((3,), 12, 40, dtype, device))
        idx = random_indices((3,), 7, 40, device)
        torch.library.opcheck(torch.ops.leanformer.predicted_sparse_mlp.default,
                              (x, w_up, b_up, w_down_t, b_down, idx, "relu"))
        torch.library.opcheck(torch.ops.leanformer.predicted_sparse_mlp.default,
                              (x, w_up, None, w_down_t, None, idx, "gelu"))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    skip_on_emu(device, "opcheck and torch.compile trace the fake kernels, not an EmuTensor")
    x, w_up, b_up, w_down_t, b_down = (t.requires_grad_(True) for t in make_mlp((2, 5), 16, 64, torch.float32, device))
    pred = NeuronPredictor(16, 64, 4).to(device)

    def f(x, w_up, b_up, w_down_t, b_down):
        idx = torch.topk(pred(x), 9, dim=-1).indices
        return predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx, activation="gelu")

    assert_compiles_like_eager(f, (x, w_up, b_up, w_down_t, b_down))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x, w_up, b_up, w_down_t, b_down = make_mlp((3,), 16, 40, torch.float32, device)
    idx = random_indices((3,), 5, 40, device)
    f = lambda *a, **kw: predicted_sparse_mlp(*a, **kw)
    cases = [
        (lambda: f(x, w_up, b_up, w_down_t, b_down, idx.int()), "indices must be int64"),
        (lambda: f(x, w_up, b_up, w_down_t, b_down, idx[:2]), "indices must be \\[..., k\\] with the leading dims of x"),
        (lambda: f(x, w_up, b_up, w_down_t, b_down, idx[0]), "indices must be \\[..., k\\] with the leading dims of x"),
        (lambda: f(x, w_up, b_up, w_down_t, b_down, torch.zeros(3, 41, dtype=torch.long, device=device)),
         "indices must have at most d_ff = 40 \\(w_up.shape\\[0\\]\\) entries per row, got k = 41"),
        (lambda: f(x, w_up, b_up, w_down_t.t(), b_down, idx), "w_down_t must be \\[d_ff, d_model\\] = \\[40, 16\\]"),
        (lambda: f(x, w_up[:, :8], b_up, w_down_t, b_down, idx), "w_up must be \\[d_ff, d_model\\] with d_model = 16"),
        (lambda: f(x, w_up, b_up[:5], w_down_t, b_down, idx), "b_up must have shape \\[d_ff\\] = \\[40\\]"),
        (lambda: f(x, w_up, b_up, w_down_t, b_down[:5], idx), "b_down must have shape \\[d_model\\] = \\[16\\]"),
        (lambda: f(x, w_up.double(), b_up, w_down_t, b_down, idx), "w_up must have the dtype of x"),
        (lambda: f(x.int(), w_up, b_up, w_down_t, b_down, idx), "x must be float32, float16, bfloat16 or float64"),
        (lambda: f(x[0, 0], w_up, b_up, w_down_t, b_down, idx), "x must be \\[..., d_model\\]"),
        (lambda: f(x, w_up, b_up, w_down_t, b_down, idx, activation="silu"), "activation must be \"relu\" or \"gelu\""),
    ]
    if device == "cpu":  # on CUDA an index out of range is a device-side assert
        cases += [(lambda: f(x, w_up, b_up, w_down_t, b_down, idx + 40), "indices must be in \\[0, d_ff\\) = \\[0, 40\\)"),
                  (lambda: f(x, w_up, b_up, w_down_t, b_down, idx - 40), "indices must be in \\[0, d_ff\\) = \\[0, 40\\)")]
    elif device == "cuda":  # emu tensors are CPU tensors: no second device type there
        cases.append((lambda: f(x, w_up, b_up, w_down_t, b_down, idx.cpu()), "indices is on cpu but x is on cuda"))
    for fn, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()
