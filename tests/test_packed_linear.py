"""packed_linear (prepacked-weight linear for decoding on the CPU) against F.linear in fp64:
odd shapes, both dtypes, gradcheck, opcheck, torch.compile, bad inputs; and the packed_linears
context that swaps it into a model's nn.Linear layers."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_compiles_like_eager
from leanformer.nn import packed_linears
from leanformer.ops import pack_linear_weight, packed_linear, unpack_linear_weight
from leanformer.models import LlamaConfig, LlamaLM

# rows: none; one (a decoding step); every block height of the AVX2 tiles (at most 6 rows, the
# blocks balanced: 2, 3, 5, 7 = 4 + 3); the AVX-512 linear's 12-row tile and its neighbours; a
# 19-node tree; several tiles
ROWS = [(0,), (1,), (2,), (3,), (5,), (7,), (11,), (12,), (13,), (19,), (77,), (3, 13)]
# (K, N): a partial panel below, at and above 32 columns, several panels with a partial last one
SIZES = [(1, 1), (7, 31), (16, 32), (33, 33), (256, 100), (100, 257)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("K,N", SIZES)
def test_matches_linear(dtype, rows, K, N):
    for bias in (True, False):
        w = torch.randn(N, K, dtype=dtype)
        b = torch.randn(N, dtype=dtype) if bias else None
        x = torch.randn(*rows, K, dtype=dtype)
        y = packed_linear(x, pack_linear_weight(w), b, N)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert y.shape == (*rows, N) and y.dtype == dtype
        if y.numel():
            err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
            assert err <= TOL[dtype], (rows, K, N, bias, err)


def test_pack_roundtrip_and_layout():
    w = torch.randn(70, 9)
    p = pack_linear_weight(w)
    assert p.shape == (3, 9, 32)
    assert torch.equal(p[1, 4, 5], w[32 + 5, 4])
    assert torch.equal(p[2, :, 6:], torch.zeros(9, 26))  # zero past N
    assert torch.equal(unpack_linear_weight(p, 70), w)


def test_rows_do_not_change_each_others_results():
    # each row's sum runs in the same order whatever the tile, so a node of a 19-node tree gets
    # bit for bit what a one-token step gets: tree decoding verifies what plain decoding computes
    w, b = torch.randn(1024, 256), torch.randn(1024)
    p, x = pack_linear_weight(w), torch.randn(19, 256)
    full = packed_linear(x, p, b, 1024)
    for i in (0, 11, 12, 18):
        assert torch.equal(packed_linear(x[i:i + 1], p, b, 1024), full[i:i + 1])


def test_non_contiguous_input():
    w = torch.randn(40, 24)
    x = torch.randn(24, 5).t()
    torch.testing.assert_close(packed_linear(x, pack_linear_weight(w), None, 40), F.linear(x, w))


def test_gradcheck():
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    p = pack_linear_weight(torch.randn(37, 13, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(37, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p, b: packed_linear(x, p, b, 37), (x, p, b))


def test_gradient_reaches_the_unpacked_weight():
    w = torch.randn(33, 8, requires_grad=True)
    x = torch.randn(4, 8)
    packed_linear(x, pack_linear_weight(w), None, 33).square().sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    F.linear(x, w2).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_opcheck():
    x = torch.randn(5, 20)
    p = pack_linear_weight(torch.randn(45, 20))
    torch.library.opcheck(torch.ops.leanformer.packed_linear.default, (x, p, torch.randn(45), 45))
    torch.library.opcheck(torch.ops.leanformer.packed_linear.default, (x, p, None, 45))


def test_compiles_fullgraph():
    x = torch.randn(2, 7, 20, requires_grad=True)
    p = pack_linear_weight(torch.randn(40, 20)).requires_grad_(True)
    b = torch.randn(40, requires_grad=True)
    assert_compiles_like_eager(lambda x, p, b: packed_linear(x, p, b, 40), (x, p, b))


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(3, 16), torch.randn(40, 16)
    p = pack_linear_weight(w)
    with pytest.raises(RuntimeError, match="packed_weight must be"):
        packed_linear(torch.randn(3, 15), p, None, 40)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        packed_linear(x.bfloat16(), p.bfloat16(), None, 40)
    with pytest.raises(RuntimeError, match="packed_weight must have the dtype of x"):
        packed_linear(x, p.double(), None, 40)
    with pytest.raises(RuntimeError, match="out_features"):
        packed_linear(x, p, None, 65)
    with pytest.raises(RuntimeError, match="out_features"):
        packed_linear(x, p, None, 32)
    with pytest.raises(RuntimeError, match=r"bias must be \[out_features\]"):
        packed_linear(x, p, torch.randn(41), 40)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        packed_linear(x, p, torch.randn(40).double(), 40)
    with pytest.raises(ValueError, match="weight must be"):
        pack_linear_weight(torch.randn(3, 4, 5))


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
    import leanformer.nn.packed_linear_layers as pl

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


def test_default_packs_single_rows_only_on_avx2_tiles():
    """One row (a plain decoding step) is faster packed than MKL's GEMV with the AVX2 tiles and
    slower with the AVX-512 ones (measured, see DEFAULT_MIN_ROWS): the default follows the tiles
    this CPU runs, and a one-row call takes the path it says."""
    from leanformer import _C
    import leanformer.nn.packed_linear_layers as pl

    assert pl.DEFAULT_MIN_ROWS == (1 if _C.cpu_vector_isa() == "avx2" else 2)
    model = small_model().eval()
    with torch.no_grad(), packed_linears(model):
        model(torch.randn(1, 24))
        packed = [bool(m.forward.cache) for m in model if isinstance(m, nn.Linear)]
    assert packed == [pl.DEFAULT_MIN_ROWS == 1] * 3


def test_kept_packed_weights_serve_the_next_context(monkeypatch):
    """keep_packed (what generate uses): a second context packs nothing again, unless a weight
    changed; release_packed frees the copies; the default keeps nothing."""
    import leanformer.nn.packed_linear_layers as pl
    from leanformer.nn import release_packed

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
    from leanformer.nn.packed_linear_layers import packed_or_linear

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
    from leanformer.decoding import MedusaHeads

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


# ---- packed_swiglu: silu(x Wg^T) * (x Wu^T) on gate and up panels side by side ----

def swiglu_reference(x, wg, wu):
    x, wg, wu = x.double(), wg.double(), wu.double()
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [(0,), (1,), (2,), (3,), (5,), (6,), (7,), (19,), (2, 9)])
@pytest.mark.parametrize("K,N", [(1, 1), (7, 31), (33, 64), (256, 100)])
def test_swiglu_matches_reference(dtype, rows, K, N):
    wg, wu = torch.randn(N, K, dtype=dtype) * K ** -0.5, torch.randn(N, K, dtype=dtype)
    x = torch.randn(*rows, K, dtype=dtype) * 3
    from leanformer.ops import pack_swiglu_weight, packed_swiglu

    y = packed_swiglu(x, pack_swiglu_weight(wg, wu), N)
    ref = swiglu_reference(x, wg, wu)
    assert y.shape == (*rows, N) and y.dtype == dtype
    if y.numel():
        err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
        assert err <= (2e-6 if dtype == torch.float32 else 1e-12), (rows, K, N, err)


def test_swiglu_gradcheck_opcheck_compile():
    from leanformer.ops import pack_swiglu_weight, packed_swiglu

    x = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    p = pack_swiglu_weight(torch.randn(37, 13, dtype=torch.float64), torch.randn(37, 13, dtype=torch.float64))
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, p: packed_swiglu(x, p, 37), (x, p))
    torch.library.opcheck(torch.ops.leanformer.packed_swiglu.default, (torch.randn(5, 20), pack_swiglu_weight(
        torch.randn(40, 20), torch.randn(40, 20)), 40))
    x32 = torch.randn(4, 20, requires_grad=True)
    p32 = pack_swiglu_weight(torch.randn(40, 20), torch.randn(40, 20)).requires_grad_(True)
    assert_compiles_like_eager(lambda x, p: packed_swiglu(x, p, 40), (x32, p32))


def test_swiglu_bad_inputs_name_the_argument():
    from leanformer.ops import pack_swiglu_weight, packed_swiglu

    x, p = torch.randn(3, 16), pack_swiglu_weight(torch.randn(40, 16), torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="packed_gate_up must be"):
        packed_swiglu(torch.randn(3, 15), p, 40)
    with pytest.raises(RuntimeError, match="packed_gate_up must be"):
        packed_swiglu(x, p[:, 0], 40)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        packed_swiglu(x.half(), p.half(), 40)
    with pytest.raises(RuntimeError, match="packed_gate_up must have the dtype of x"):
        packed_swiglu(x, p.double(), 40)
    with pytest.raises(RuntimeError, match="hidden = 70"):
        packed_swiglu(x, p, 70)
    with pytest.raises(ValueError, match="gate_weight and up_weight"):
        pack_swiglu_weight(torch.randn(40, 16), torch.randn(41, 16))


def test_context_fuses_a_swiglu_mlp(monkeypatch):
    from leanformer.models.llama import SwiGLU
    import leanformer.nn.packed_linear_layers as pl

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
