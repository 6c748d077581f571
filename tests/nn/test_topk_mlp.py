"""nn.TopKMLP: a drop-in for nn's MLP (same parameters), its sparse and dense paths against the
top-k MLP reference, the switch between them, and the cached transposed weight."""
import logging

import pytest
import torch

from leanformer.nn import MLP, TopKMLP
from leanformer.reference import topk_mlp_reference


def test_topkmlp_is_a_drop_in_for_mlp():
    dense = MLP(24, 80, activation="relu")
    sparse = TopKMLP(24, 80, k=80, activation="relu")
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in dense.named_parameters()]
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_topkmlp_paths_agree_and_train(mode):
    torch.manual_seed(0)
    m = TopKMLP(32, 128, k=9, mode=mode)
    x = torch.randn(3, 4, 32, requires_grad=True)
    y = m(x)
    ref = topk_mlp_reference(x, m.fc1.weight, m.fc1.bias, m.fc2.weight.t(), m.fc2.bias, 9)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    x2 = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    topk_mlp_reference(x2, params[0], params[1], params[2].t(), params[3], 9).square().sum().backward()
    for g, gr in zip(grads, [p.grad for p in params] + [x2.grad]):
        torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-4)


def test_topkmlp_switches_to_dense_and_logs_it(caplog):
    m = TopKMLP(32, 128, k=40, max_sparse_rows=8, max_sparse_ratio=0.2)  # 31% > 20%
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="leanformer.nn.topk_mlp"):
        m(torch.randn(1, 32))
        assert m.last_path == "sparse"
        m(torch.randn(2, 9, 32))  # 18 rows > 8
        assert m.last_path == "dense"
        m(torch.randn(2, 9, 32))  # the same path again: not logged twice
        m(torch.randn(3, 32))
        assert m.last_path == "sparse"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "dense path" in messages[1] and "18 rows > max_sparse_rows=8" in messages[1]
    assert "k/hidden = 31.2% > max_sparse_ratio=20%" in messages[1]
    low_ratio = TopKMLP(32, 128, k=4, max_sparse_rows=8, max_sparse_ratio=0.2)  # 3%: sparse at any N
    with torch.no_grad():
        low_ratio(torch.randn(100, 32))
    assert low_ratio.last_path == "sparse"


def test_topkmlp_caches_the_transposed_weight_only_without_grad():
    m = TopKMLP(16, 64, k=5, mode="sparse")
    x = torch.randn(2, 16)
    with torch.no_grad():
        y0 = m(x)
        assert m._w_down_t_cache is not None
        m.fc2.weight.mul_(2)  # an in-place update bumps the version: the cache must refresh
        y1 = m(x)
    torch.testing.assert_close(y1 - m.fc2.bias, 2 * (y0 - m.fc2.bias))
    with pytest.raises(ValueError, match="k must be in \\[0, hidden\\]"):
        TopKMLP(16, 64, k=65)
    with pytest.raises(ValueError, match="mode must be"):
        TopKMLP(16, 64, k=5, mode="fast")
