"""The packed_linears context (leanformer.nn.packed_linear_layers): it swaps packed_linear (and
packed_swiglu for a SwiGLU MLP) into a model's nn.Linear layers within a range of rows and
restores them, keeps or releases the packed copies, repacks a weight changed in place, logs
each path once, trains the real weights, and serves Medusa's stacked drafter heads."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanformer.nn.packed_linear_layers as pl
from leanformer.decoding import MedusaHeads
from leanformer.models import LlamaConfig, LlamaLM
from leanformer.models.llama import SwiGLU
from leanformer.nn import packed_linears, release_packed
from leanformer.nn.packed_linear_layers import packed_or_linear


def small_model():
    return nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 24), nn.Linear(24, 3, bias=False))


def test_context_packs_and_restores():
    model = small_model().eval()
    x = torch.randn(5, 24)
    ref = model(x)
    with torch.inference_mode(), packed_linears(model) as n:
        assert n == 3
        assert all("forward" in m.__dict__ for m in model if isinstance(m, nn.Linear))
        torch.testing.assert_close(model(x), ref)
    assert not any("forward" in m.__dict__ for m in model)
    torch.testing.assert_close(model(x), ref)


def test_context_runs_the_packed_kernel_within_its_rows(monkeypatch):
    model = small_model().eval()
    calls = []
    real = pl.packed_linear
    monkeypatch.setattr(pl, "packed_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad(), packed_linears(model, min_rows=2, max_rows=8):
        model(torch.randn(2, 4, 24))  # 8 rows: packed
        assert len(calls) == 3
        model(torch.randn(9, 24))  # 9 rows: F.linear
        model(torch.randn(1, 24))  # 1 row: F.linear (below min_rows = 2)
        assert len(calls) == 3
    with torch.no_grad(), packed_linears(model, min_rows=1):
        model(torch.randn(1, 24))
        assert len(calls) == 6


def test_default_packs_single_rows():
    """One row (a plain decoding step) is at least as fast packed as MKL's GEMV with either tiles,
    much faster on some hosts (measured, see DEFAULT_MIN_ROWS): a one-row call is packed."""
    assert pl.DEFAULT_MIN_ROWS == 1
    model = small_model().eval()
    with torch.no_grad(), packed_linears(model):
        model(torch.randn(1, 24))
        packed = [bool(m.forward.cache) for m in model if isinstance(m, nn.Linear)]
    assert packed == [pl.DEFAULT_MIN_ROWS == 1] * 3


def test_kept_packed_weights_serve_the_next_context(monkeypatch):
    """keep_packed (what generate uses): a second context packs nothing again, unless a weight
    changed; release_packed frees the copies; the default keeps nothing."""
    model = small_model().eval()
    packs = []
    real = pl.pack_linear_weight
    monkeypatch.setattr(pl, "pack_linear_weight", lambda w: packs.append(w.shape) or real(w))
    x = torch.randn(5, 24)
    ref = model(x)
    for _ in range(2):
        with torch.inference_mode(), packed_linears(model, keep_packed=True):
            torch.testing.assert_close(model(x), ref)
    assert len(packs) == 3  # three linears, packed once across both contexts
    with torch.no_grad():
        model[0].weight.mul_(2)
        changed = model(x)
    with torch.inference_mode(), packed_linears(model, keep_packed=True):
        torch.testing.assert_close(model(x), changed)
    assert len(packs) == 4  # only the changed layer again
    assert release_packed(model) == 3 and release_packed(model) == 0
    with torch.inference_mode(), packed_linears(model):
        model(x)
    with torch.inference_mode(), packed_linears(model):
        model(x)
    assert len(packs) == 10  # released, then two contexts that keep nothing
    assert release_packed(model) == 0


def test_context_packs_a_layer_on_its_first_packed_call():
    model = small_model().eval()
    with torch.no_grad(), packed_linears(model, min_rows=2):
        model(torch.randn(1, 24))  # one row, below min_rows: F.linear, nothing packed
        assert all(not m.forward.cache for m in model if isinstance(m, nn.Linear))
        model(torch.randn(3, 24))
        assert all(m.forward.cache["packed"].shape[1:] == (m.in_features, 32) for m in model if isinstance(m, nn.Linear))


def test_context_logs_each_path_once(caplog):
    model = small_model().eval()
    with caplog.at_level(logging.INFO, logger="leanformer.nn.packed_linear_layers"), torch.no_grad(), \
            packed_linears(model, min_rows=2, max_rows=4):
        for _ in range(3):
            model(torch.randn(2, 24))
            model(torch.randn(5, 24))
            model(torch.randn(1, 24))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["packed_linears: packed_linear for 2 rows", "packed_linears: F.linear (5 rows, outside 2..4)",
                    "packed_linears: F.linear (1 rows, outside 2..4)"], msgs


def test_context_with_gradients_trains_the_real_weights():
    model = small_model()
    x = torch.randn(3, 24)
    with packed_linears(model):
        model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, g_ref in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, g_ref)


def test_context_repacks_a_weight_changed_in_place():
    model = small_model().eval()
    x = torch.randn(2, 24)
    with torch.no_grad(), packed_linears(model):
        model(x)
        model[0].weight.mul_(2)
        torch.testing.assert_close(model(x), model[3](model[2](model[1](F.linear(x, model[0].weight, model[0].bias)))))


def test_context_leaves_other_dtypes_and_nesting_alone():
    model = small_model().double()
    with packed_linears(model) as n:
        assert n == 0
    model = small_model()
    with packed_linears(model, model[0], None, object()) as n, packed_linears(model) as inner:
        assert n == 3 and inner == 0
    assert not any("forward" in m.__dict__ for m in model)
    for bad in (dict(max_rows=0), dict(min_rows=0), dict(min_rows=5, max_rows=4)):
        with pytest.raises(ValueError, match="min_rows <= max_rows"):
            with packed_linears(model, **bad):
                pass


def test_stacked_drafter_heads_follow_the_context():
    w, b, x = torch.randn(64, 24), torch.randn(64), torch.randn(3, 24)
    cache = {}
    ref = F.linear(x, w, b)
    assert torch.equal(packed_or_linear(x, w, b, cache), ref) and not cache  # no context: F.linear
    with torch.no_grad(), packed_linears(small_model(), min_rows=2):
        torch.testing.assert_close(packed_or_linear(x, w, b, cache), ref)
        assert "packed" in cache
        w.mul_(2)  # repacked when the weight changes
        torch.testing.assert_close(packed_or_linear(x, w, b, cache), F.linear(x, w, b))
        big = torch.randn(200, 24)
        torch.testing.assert_close(packed_or_linear(big, w, b, cache), F.linear(big, w, b))
        one = torch.randn(1, 24)  # below the context's min_rows = 2 unless the caller lowers it
        cache.clear()
        torch.testing.assert_close(packed_or_linear(one, w, b, cache), F.linear(one, w, b))
        assert not cache
        torch.testing.assert_close(packed_or_linear(one, w, b, cache, min_rows=1), F.linear(one, w, b))
        assert "packed" in cache


def test_medusa_drafts_one_row_through_the_packed_kernel():
    """The drafter's stacked heads run packed for the one accepted node of a step, even where
    the model's own one-row layers stay on F.linear (min_rows = 2, the AVX-512 default)."""
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=64, depth=2, num_heads=4, num_kv_heads=2)).eval()
    heads = MedusaHeads(model, 3)
    with torch.no_grad():
        for h in heads.heads:
            h.weight.normal_(std=0.1)
        hidden = torch.randn(1, 64)
        ref = heads.head_logits(hidden)
        with packed_linears(model, heads, min_rows=2), torch.profiler.profile() as prof:
            out = heads.head_logits(hidden)
            model(torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    names = [e.name for e in prof.events() if e.cpu_parent is None]
    assert names.count("leanformer::packed_linear") == 2  # the stacked heads (1 row) and the head (3 rows)
    assert "aten::linear" in names  # the model's one-row step


def test_context_fuses_a_swiglu_mlp(monkeypatch):
    mlp = SwiGLU(24, 70).eval()
    x = torch.randn(3, 5, 24)
    ref = mlp(x)
    calls = []
    real = pl.packed_swiglu
    monkeypatch.setattr(pl, "packed_swiglu", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad(), packed_linears(mlp, min_rows=2) as n:
        assert n == 4  # the MLP and its three linears
        torch.testing.assert_close(mlp(x), ref)
        assert len(calls) == 1
        torch.testing.assert_close(mlp(x[:1, :1]), ref[:1, :1])  # one row, below min_rows: the module's own forward
        assert len(calls) == 1
        mlp.up.weight.mul_(2)  # repacked
        torch.testing.assert_close(mlp(x), mlp.down(F.silu(mlp.gate(x)) * mlp.up(x)))
    assert "forward" not in mlp.__dict__
