"""fold_batchnorm: folded models equal the unfolded eval model and contain no norm."""
import pytest
import torch
from torch import nn

from leanformer import fold_batchnorm
from leanformer.nn import PRepBN, RepBN


def train_a_little(model, shape, steps=3):
    model.train()
    for _ in range(steps):
        model(torch.randn(shape) * 2 + 1)
    # Non-trivial affine parameters, as after real training.
    for m in model.modules():
        if isinstance(m, RepBN):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.alpha.fill_(0.3)
    return model.eval()


class Block(nn.Module):
    """A norm feeding two Linears (like separate q and k projections) and a final norm."""

    def __init__(self, C):
        super().__init__()
        self.norm = PRepBN(C, total_steps=2)
        self.q, self.k = nn.Linear(C, C), nn.Linear(C, C)
        self.out = nn.Linear(C, C, bias=False)
        self.final = RepBN(C)

    def forward(self, x):
        h = self.norm(x)
        return self.final(self.out(torch.relu(self.q(h)) * self.k(h)))

    def fold_pairs(self):
        return [("norm", ["q", "k"], "forward"), ("final", ["out"], "backward")]


def assert_no_norm(model):
    assert not [m for m in model.modules() if isinstance(m, (RepBN, PRepBN, nn.LayerNorm))]


def test_sequential_forward_and_backward_folds():
    model = train_a_little(nn.Sequential(nn.Linear(8, 16), RepBN(16), nn.Linear(16, 4), RepBN(4)), (5, 7, 8))
    x = torch.randn(3, 7, 8)
    folded = fold_batchnorm(model)
    assert_no_norm(folded)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, RepBN) for m in model.modules()), "the original is left alone"


def test_fold_pairs_with_prepbn_and_shared_norm():
    model = train_a_little(nn.Sequential(Block(12), Block(12)), (4, 9, 12), steps=4)
    x = torch.randn(2, 9, 12)
    folded = fold_batchnorm(model)
    assert_no_norm(folded)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert folded[0].out.bias is not None


def test_unfoldable_norms_say_where_and_why():
    model = train_a_little(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), RepBN(6), nn.ReLU()), (3, 6))
    with pytest.raises(ValueError, match="cannot fold 2: no adjacent Linear is declared"):
        fold_batchnorm(model)
    fresh = nn.Sequential(RepBN(6), nn.Linear(6, 6))
    with pytest.raises(ValueError, match="cannot fold 0: has no running statistics"):
        fold_batchnorm(fresh)
