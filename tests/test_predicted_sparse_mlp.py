"""predicted_sparse_mlp, NeuronPredictor / fit_predictor / recall and nn.PredictedSparseMLP."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from leanformer.nn import MLP, NeuronPredictor, PredictedSparseMLP, fit_predictor, recall
from leanformer.ops import predicted_sparse_mlp, topk_mlp
from leanformer.reference import predicted_sparse_mlp_reference
from test_topk_mlp import CASES, assert_close, grads_of, make_mlp


def random_indices(lead, k, d_ff, device, repeats=False):
    if repeats:
        return torch.randint(0, d_ff, (*lead, k), device=device)
    return torch.stack([torch.randperm(d_ff, device=device)[:k] for _ in range(int(torch.tensor(lead).prod()))]
                       ).reshape(*lead, k)


@pytest.mark.parametrize("device,dtype", CASES)
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
    for dtype in (torch.float32, torch.float64):
        x, w_up, b_up, w_down_t, b_down = (t.requires_grad_(True) for t in make_mlp((3,), 12, 40, dtype, device))
        idx = random_indices((3,), 7, 40, device)
        torch.library.opcheck(torch.ops.leanformer.predicted_sparse_mlp.default,
                              (x, w_up, b_up, w_down_t, b_down, idx, "relu"))
        torch.library.opcheck(torch.ops.leanformer.predicted_sparse_mlp.default,
                              (x, w_up, None, w_down_t, None, idx, "gelu"))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    x, w_up, b_up, w_down_t, b_down = (t.requires_grad_(True) for t in make_mlp((2, 5), 16, 64, torch.float32, device))
    pred = NeuronPredictor(16, 64, 4).to(device)

    def f(x, w_up, b_up, w_down_t, b_down):
        idx = torch.topk(pred(x), 9, dim=-1).indices
        return predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, idx, activation="gelu")

    args = (x, w_up, b_up, w_down_t, b_down)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, out_ref = compiled(*args), f(*args)
    torch.testing.assert_close(out, out_ref)
    for g, gr in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(out_ref.sum(), args)):
        torch.testing.assert_close(g, gr)


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
    else:
        cases.append((lambda: f(x, w_up, b_up, w_down_t, b_down, idx.cpu()), "indices is on cpu but x is on cuda"))
    for fn, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn()


# ---- predictor, recall, module ----

def _teacher(dim=32, hidden=256, n=3000, seed=0):
    """A ReLU MLP whose activations depend on a low-dimensional part of its input (as a trained
    model's do), and inputs for it."""
    g = torch.Generator().manual_seed(seed)
    mlp = MLP(dim, hidden, activation="relu")
    with torch.no_grad():
        basis = torch.randn(8, dim, generator=g)
        mlp.fc1.weight.copy_(torch.randn(hidden, 8, generator=g) @ basis / 8 + 0.02 * torch.randn(hidden, dim, generator=g))
        mlp.fc1.bias.copy_(-0.5 + 0.1 * torch.randn(hidden, generator=g))
    xs = torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, dim, generator=g)
    return mlp, xs


def test_fit_predictor_learns_the_topk_set():
    mlp, xs = _teacher()
    train, held_out = xs[:2500], xs[2500:]
    k = 26  # 10%
    untrained = NeuronPredictor(32, 256, 8)
    base = recall(untrained, mlp, held_out, k)["recall"]
    trained = recall(fit_predictor(mlp, train, k, steps=150, rank=8, svd_init=False, lr=1e-2), mlp, held_out, k)
    assert trained["recall"] > 0.7 and trained["recall"] > base + 0.4, (trained, base)
    pred = fit_predictor(mlp, train, k, steps=150, rank=8)  # from the SVD of fc1 (low rank here)
    r = recall(pred, mlp, held_out, k)
    assert r["recall"] > 0.9, r
    assert r["mass_recall"] >= r["recall"] - 0.05
    # a larger predicted set finds more; the full set finds everything
    assert recall(pred, mlp, held_out, k, k_pred=2 * k)["recall"] >= r["recall"]
    assert recall(pred, mlp, held_out, k, k_pred=256)["recall"] == 1.0
    with pytest.raises(ValueError, match="k must be in"):
        fit_predictor(mlp, train, 0, steps=1)


def test_predicted_sparse_mlp_module():
    mlp, xs = _teacher()
    k = 64
    pred = fit_predictor(mlp, xs, k, steps=100, rank=8)
    m = PredictedSparseMLP.from_mlp(mlp, k, pred)
    names = {n for n, _ in m.named_parameters()}
    assert {n for n, _ in mlp.named_parameters()} <= names and "predictor.down.weight" in names
    x = xs[:5]
    with torch.no_grad():
        y = m(x)
        idx = pred.predict(x, k)
        ref = predicted_sparse_mlp_reference(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight.t(), mlp.fc2.bias, idx)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        assert m.last_path == "predicted"
        m.mode = "oracle"
        oracle = m(x)
        torch.testing.assert_close(oracle, topk_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight.t().contiguous(),
                                                    mlp.fc2.bias, k))
        # close to the true top-k MLP when the recall is high
        assert ((y - oracle).norm() / oracle.norm()) < 0.1
    # trainable through the op
    fresh = PredictedSparseMLP(32, 256, k=20, rank=4, mode="predicted")
    fresh(torch.randn(3, 32)).sum().backward()
    assert fresh.fc1.weight.grad is not None and fresh.fc2.weight.grad is not None
    # state dicts of MLP load (the predictor's keys are extra)
    missing, unexpected = fresh.load_state_dict(mlp.state_dict(), strict=False)
    assert set(missing) == {"predictor.down.weight", "predictor.up.weight", "predictor.up.bias"} and not unexpected
    with pytest.raises(RuntimeError, match="has no predictor"):
        PredictedSparseMLP.from_mlp(mlp, k, None, mode="predicted")(x)
    with pytest.raises(ValueError, match="mode must be"):
        PredictedSparseMLP(32, 256, k=20, mode="sparse")


def test_predicted_mlp_switches_to_dense_at_many_rows_and_high_k_and_logs_it(caplog):
    import logging

    from leanformer.nn import PredictedSparseMLP

    torch.manual_seed(0)
    m = PredictedSparseMLP(16, 64, k=16, rank=8)  # k/hidden = 25% > 10%
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="leanformer.nn.neuron_predictor"):
        few, many = torch.randn(3, 16), torch.randn(2, 9, 16)
        y_few = m(few)
        assert m.last_path == "predicted"
        y_many = m(many)
        assert m.last_path == "predicted-dense"
        m(many)  # same path: not logged again
        # The dense path computes the same neurons: equal to the sparse op on those rows.
        m.max_sparse_rows = 10 ** 9
        torch.testing.assert_close(m(many), y_many, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(few), y_few)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "predicted-dense path (18 rows, k/hidden = 25.0%" in messages[1]
    oracle = PredictedSparseMLP(16, 64, k=16, rank=0)
    with torch.no_grad():
        x = torch.randn(20, 16)
        y = oracle(x)
        assert oracle.last_path == "oracle-dense"
        oracle.max_sparse_rows = 10 ** 9
        torch.testing.assert_close(oracle(x), y, atol=1e-5, rtol=1e-5)
        assert oracle.last_path == "oracle"
