"""leanformer.compress: dsformer() and its baselines low_rank() and nm_prune() at equal storage,
with honest storage accounting, on small models."""
import copy
import io
import logging

import pytest
import torch
from torch import nn

from leanformer.compress import (dsformer, dsformer_rank, finalize_straight_through, low_rank, nearest_pattern,
                                 nm_prune, pattern_compression, select_linears, to_straight_through)
from leanformer.compress.nm_prune import ALL_PATTERNS
from leanformer.compress.storage import dense_bits, dense_sparse_bits, low_rank_bits
from leanformer.nn import DenseSparseLinear, LowRankLinear, NMSparseLinear, StraightThroughFactorizer
from tests.helpers import trained_like


class Tiny(nn.Module):
    """An embedding, two blocks' worth of Linear layers and a head."""

    def __init__(self, dim=32, hidden=64, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.mix = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for lin in (self.up, self.down, self.mix):
                lin.weight.copy_(trained_like(*lin.weight.shape, decay=0.85) * 0.5)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x + self.mix(x))


def compressed_bits(module):
    return module.storage_bits() if hasattr(module, "storage_bits") else \
        sum(p.numel() * p.element_size() * 8 for p in module.parameters())


@pytest.mark.parametrize("compression", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_dsformer_rank_choice_meets_the_compression(compression, n, m):
    model = Tiny()
    originals = {name: copy.deepcopy(lin) for name, lin in select_linears(model)}
    result = dsformer(model, compression=compression, n=n, m=m, iters=2)
    assert set(result.layers) == {"up", "down", "mix"}  # not the embedding, not the head
    assert isinstance(model.head, nn.Linear) and isinstance(model.embed, nn.Embedding)
    for name, info in result.layers.items():
        lin, layer = originals[name], model.get_submodule(name)
        assert isinstance(layer, DenseSparseLinear) and layer.rank == info.rank
        out_f, in_f, bias = lin.out_features, lin.in_features, lin.bias is not None
        # honest: the accounting is what the module really stores, and the rank is the largest that fits
        assert info.compressed_bits == layer.storage_bits() == dense_sparse_bits(out_f, in_f, info.rank, n, m, bias, 32)
        assert info.dense_bits == dense_bits(out_f, in_f, bias, 32)
        assert info.compression >= compression
        if info.rank < min(out_f, in_f):
            assert dense_bits(out_f, in_f, bias, 32) / dense_sparse_bits(out_f, in_f, info.rank + 1, n, m, bias, 32) < compression
        # reconstruction within the reported error
        err = ((lin.weight - layer.dense_weight()).norm() / lin.weight.norm()).item()
        assert abs(err - info.error) < 1e-5
    assert result.compression >= compression


def test_dsformer_changes_outputs_by_a_bounded_amount():
    model = Tiny()
    ids = torch.randint(0, 50, (4, 9))
    x = model.embed(ids).detach()
    before_layer, before = copy.deepcopy(model.up), model(ids).detach()
    result = dsformer(model, compression=2.0)
    # per layer: ||x (W - W')^T||_F <= ||x||_F ||W - W'||_F = ||x||_F err ||W||_F
    change = (model.up(x) - before_layer(x)).norm()
    assert 0 < change <= x.norm() * result.layers["up"].error * before_layer.weight.norm() * (1 + 1e-5)
    after = model(ids).detach()
    relative = ((after - before).norm() / before.norm()).item()
    assert 0 < relative < 0.3, relative


def test_compressed_model_state_dict_round_trip():
    model = Tiny()
    dsformer(model, compression=2.0, iters=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = Tiny()
    torch.manual_seed(5)
    dsformer(fresh, compression=2.0, method="svd")  # the same structure, other values
    ids = torch.randint(0, 50, (2, 7))
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(fresh(ids), model(ids))


def test_straight_through_round_trip_of_a_model():
    model = Tiny()
    dsformer(model, compression=2.0, iters=1)
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids)
    assert to_straight_through(model) == ["up", "down", "mix"]
    assert isinstance(model.up, StraightThroughFactorizer)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert finalize_straight_through(model) == ["up", "down", "mix"]
    assert isinstance(model.up, DenseSparseLinear)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_low_rank_meets_the_compression_at_the_largest_rank():
    model = Tiny()
    result = low_rank(model, 2.0)
    for name, info in result.layers.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == info.rank
        assert info.compressed_bits == compressed_bits(layer) and info.compression >= 2.0
        out_f, in_f, bias = layer.out_features, layer.in_features, layer.up.bias is not None
        assert dense_bits(out_f, in_f, bias, 32) / low_rank_bits(out_f, in_f, info.rank + 1, bias, 32) < 2.0


def test_dsformer_at_equal_storage_reconstructs_no_worse_than_nothing():
    """Both baselines and DSFormer report errors in (0, 1) at 2x on trained-like weights."""
    for fn in (lambda m: dsformer(m, compression=2.0), lambda m: low_rank(m, 2.0),
               lambda m: nm_prune(m, compression=2.0)):
        result = fn(Tiny())
        assert all(0 < l.error < 1 for l in result.layers.values())


def test_nm_prune_picks_the_nearest_pattern_and_reports_what_it_gives():
    for target in (1.5, 2.0, 3.0, 4.0):
        best = nearest_pattern(target, in_features=64)
        gaps = [abs(pattern_compression(n, m, 32, 64) - target) for n, m in ALL_PATTERNS]
        assert abs(pattern_compression(*best, 32, 64) - target) == min(gaps)
    model = Tiny()
    w = model.up.weight.detach().clone()
    result = nm_prune(model, compression=2.0)
    n, m = nearest_pattern(2.0, in_features=32)
    assert isinstance(model.up, NMSparseLinear) and (model.up.n, model.up.m) == (n, m)
    assert result.layers["up"].pattern == f"{n}:{m}"
    assert result.layers["up"].compressed_bits == model.up.storage_bits()
    assert torch.equal(model.up.dense_weight(), w * (model.up.dense_weight() != 0))
    model = Tiny()
    result = nm_prune(model, 2, 4)
    # 2:4 in fp32: half the values plus 2 bits each, and the bias at full size
    expected = (64 * 32 + 64) * 32 / (64 * (16 * 32 + 32) + 64 * 32)
    assert abs(result.layers["up"].compression - expected) < 1e-12


def test_module_selection_by_names_and_predicate():
    model = Tiny()
    result = dsformer(model, compression=2.0, modules=["mix", "head"], iters=1)
    assert set(result.layers) == {"mix", "head"} and isinstance(model.up, nn.Linear)
    model = Tiny()
    result = low_rank(model, 2.0, modules=lambda name, lin: lin.out_features == 64)
    assert set(result.layers) == {"up"}


def test_default_selection_skips_a_layer_whose_width_is_not_a_multiple_of_m(caplog):
    model = Tiny()
    model.odd = nn.Linear(30, 8)
    with caplog.at_level(logging.WARNING, logger="leanformer.compress.selection"):
        result = dsformer(model, compression=2.0, iters=1)
    assert "odd" not in result.layers
    assert "skipping odd: in_features=30 is not a multiple of 4 (it stays dense)" in caplog.text
    with pytest.raises(ValueError, match="odd has in_features=30, not a multiple of 4"):
        dsformer(model, compression=2.0, modules=["odd"])


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="compression must be > 1"):
        dsformer(Tiny(), compression=1.0)
    with pytest.raises(ValueError, match="compression must be > 1"):
        low_rank(Tiny(), 0.5)
    with pytest.raises(ValueError, match=r"up \(64x32\) cannot reach compression 1000"):
        dsformer(Tiny(), compression=1000)
    with pytest.raises(ValueError, match="'nope' must name an nn.Linear of the model, it is not found"):
        dsformer(Tiny(), compression=2.0, modules=["nope"])
    with pytest.raises(ValueError, match="'embed' must name an nn.Linear of the model, it is a Embedding"):
        dsformer(Tiny(), compression=2.0, modules=["embed"])
    with pytest.raises(ValueError, match="either the pattern"):
        nm_prune(Tiny(), 2, 4, compression=2.0)
    with pytest.raises(ValueError, match="no nn.Linear layer to compress"):
        low_rank(Tiny(), 2.0, modules=lambda name, lin: False)
    model = Tiny()
    with pytest.raises(ValueError, match="cannot reach"):
        dsformer(model, compression=1000)
    assert isinstance(model.up, nn.Linear), "a failing call leaves the model unchanged"


def test_dsformer_rank_is_zero_when_nothing_fits():
    assert dsformer_rank(nn.Linear(8, 8), 100.0, 2, 4) == 0
    # 8x8 + bias = 2304 bits; per rank 8 + 4 values and one meta word = 416 bits, + 256 bias: 4 fit in 2281
    assert dsformer_rank(nn.Linear(8, 8), 1.01, 2, 4) == 4
