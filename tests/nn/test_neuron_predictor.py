"""NeuronPredictor, fit_predictor and recall (does the predictor find a ReLU MLP's top-k
neurons), and nn.PredictedSparseMLP: built from an MLP, trainable, its predicted, oracle and
dense paths and the switch between them."""
import logging

import pytest
import torch

from leanformer.nn import MLP, NeuronPredictor, PredictedSparseMLP, fit_predictor, recall
from leanformer.ops import topk_mlp
from leanformer.reference import predicted_sparse_mlp_reference


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
