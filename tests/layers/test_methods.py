"""The intermediate-layer methods built on leanformer.layers: SoFT, early exit, LLM-Drop's
importance, the lenses, residual contributions and back-patching, on tiny LMs."""
import math

import pytest
import torch
import torch.nn.functional as F

from leanformer.layers import drop_modules, early_exit, head, patch_layer
from leanformer.layers.back_patching import _last_position, back_patching
from leanformer.layers.drop import drop_order, importance
from leanformer.layers.lens import TunedLens, TunedLensLoss, lens_table
from leanformer.layers.residual import contributions
from leanformer.layers.sorted import SortedLoss, exit_losses, exit_perplexities
from leanformer.models import LlamaConfig, LlamaLM, LMConfig, SLABLM


def lm(depth=3, **kw):
    return SLABLM(LMConfig(dim=32, depth=depth, num_heads=2, attention="sla", norm="layernorm", **kw)).eval()


def windows(n=4, length=12):
    return torch.randint(0, 256, (n, length + 1))


def test_sorted_loss_at_the_last_layer_is_the_lm_loss_and_exits_train_only_their_layers():
    model, batch = lm(), windows()
    logits = model(batch[:, :-1])
    plain = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
    assert torch.allclose(SortedLoss(model, [3])(batch), plain, atol=1e-6)
    losses = exit_losses(model, batch, [1, 3])
    assert torch.allclose(SortedLoss(model, [3, 1])(batch), losses[1] + losses[3], atol=1e-6)
    SortedLoss(model, [1])(batch).backward()
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks[1].parameters())
    ppl = exit_perplexities(model, batch, batch_size=3)
    assert set(ppl) == {1, 2, 3} and math.isclose(ppl[3], math.exp(plain.item()), rel_tol=1e-5)
    later = exit_perplexities(model, batch, [2], from_position=5)[2]
    want = F.cross_entropy(model(batch[:, :-1], exit_layer=2)[:, 5:].reshape(-1, 256), batch[:, 6:].reshape(-1))
    assert math.isclose(later, math.exp(want.item()), rel_tol=1e-5)
    with pytest.raises(IndexError, match="exit 4 is out of range"):
        SortedLoss(model, [1, 4])


def test_early_exit_that_never_fires_is_ordinary_decoding():
    model, ids = lm(), windows(2, 14)
    full = model(ids)
    cache = model.new_cache()
    model(ids[:, :6], cache=cache)
    for t in range(6, 14):
        logits, layers = early_exit.step(model, ids[:, t:t + 1], cache, criterion="cosine", threshold=2.0)
        assert torch.allclose(logits, full[:, t], atol=1e-4) and layers.tolist() == [3, 3]
    r = early_exit.evaluate(model, ids, criterion="confidence", threshold=2.0, prefill=6)
    want = F.cross_entropy(full[:, 6:-1].reshape(-1, 256), ids[:, 7:].reshape(-1))
    assert r["avg_layers"] == 3 and math.isclose(r["val_ppl"], math.exp(want.item()), rel_tol=1e-4)


def test_exit_at_the_first_layer_fills_the_skipped_caches_from_its_hidden_state():
    model, ids = lm(), windows(1, 13)
    cache = model.new_cache()
    model(ids[:, :6], cache=cache)
    outs = []
    for t in range(6, 14):
        logits, layers = early_exit.step(model, ids[:, t:t + 1], cache, criterion="cosine", threshold=-2.0)
        assert layers.tolist() == [1]
        outs.append(logits)
    # Block 0 never sees the fills, so every token's prediction is the exit-1 sub-model's ...
    assert torch.allclose(torch.stack(outs, 1), model(ids, exit_layer=1)[:, 6:], atol=1e-4)
    # ... and block 1 cached its attention over the prefill's own states then the exit states.
    _, hidden = model(ids[:, :6], output_hidden_states=True)
    exit_states = model(ids, exit_layer=1, output_hidden_states=True)[1][1][:, 6:]
    block, ref = model.blocks[1], model.new_cache().layers[1]
    block.attn(block.norm1(torch.cat([hidden[1], exit_states], 1)), cache=ref)
    assert cache.layers[1].length == ref.length == 14
    for got, want in zip(cache.layers[1].state, ref.state):
        assert torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(cache.layers[1].conv_tail, ref.conv_tail, atol=1e-5)


def test_batched_early_exit_matches_each_row_alone():
    model, ids = lm(depth=4), windows(3, 12)
    _, hidden = model(ids, output_hidden_states=True)
    scores = torch.cat([F.cosine_similarity(hidden[i + 1], hidden[i], dim=-1).flatten() for i in range(1, 3)])
    # Between two observed scores (some tokens leave early, some do not), not on one: a score
    # equal to the threshold would be decided by rounding.
    middle = scores.sort().values[len(scores) // 2 - 1:len(scores) // 2 + 1]
    threshold = middle.mean().item()
    caches = [model.new_cache() for _ in range(4)]
    model(ids[:, :5], cache=caches[0])
    for r in range(3):
        model(ids[r:r + 1, :5], cache=caches[r + 1])
    used = []
    for t in range(5, 12):
        batched, layers = early_exit.step(model, ids[:, t:t + 1], caches[0], criterion="cosine", threshold=threshold)
        for r in range(3):
            alone, l = early_exit.step(model, ids[r:r + 1, t:t + 1], caches[r + 1], criterion="cosine",
                                       threshold=threshold)
            assert torch.allclose(batched[r], alone[0], atol=1e-4) and layers[r] == l[0]
        used += layers.tolist()
    assert len(set(used)) > 1, used
    with pytest.raises(ValueError, match="criterion must be one of"):
        early_exit.step(model, ids[:, :1], caches[0], criterion="entropy", threshold=0.5)
    with pytest.raises(ValueError, match="prefill must be in 1..11"):
        early_exit.evaluate(model, ids, criterion="cosine", threshold=0.5, prefill=12)


def test_importance_ranks_a_sub_block_that_writes_nothing_first():
    model, ids = lm(depth=4), windows(3, 10)[:, :-1]
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight.zero_()
        model.blocks[2].mlp.fc2.bias.zero_()
    scores = importance(model, [ids])
    assert scores["mlp"][2] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= s <= 2 for k in scores.values() for s in k)
    assert drop_order(scores["mlp"])[0] == 2
    before = model(ids)
    drop_modules(model, mlp=[2])
    assert torch.allclose(model(ids), before, atol=1e-6)
    assert importance(model, [ids])["mlp"][2] is None and drop_order(importance(model, [ids])["mlp"]) != []


def test_residual_contributions_match_a_computation_by_hand():
    model, ids = lm(depth=2), windows(2, 9)[:, :-1]
    stats = contributions(model, [ids[:1], ids[1:]])
    with torch.no_grad():
        x = model.embed(ids)
        b = model.blocks[0]
        h = b.attn(b.norm1(x))
        m = b.mlp(b.norm2(x + h))
    rel = lambda h, x: (h.norm(dim=-1) / x.norm(dim=-1)).mean().item()
    cos = lambda a, c: F.cosine_similarity(a, c, dim=-1).mean().item()
    assert stats["attention"][0]["relative_norm"] == pytest.approx(rel(h, x), rel=1e-5)
    assert stats["attention"][0]["cos_to_residual"] == pytest.approx(cos(h, x), rel=1e-5, abs=1e-6)
    assert stats["mlp"][0]["relative_norm"] == pytest.approx(rel(m, x + h), rel=1e-5)
    assert stats["mlp"][0]["cos_in_out"] == pytest.approx(cos(x + h, x + h + m), rel=1e-5)
    assert not any(blk._forward_hooks or blk._forward_pre_hooks for blk in model.modules())


def test_the_lenses_are_exact_at_the_last_layer():
    model, val = lm(), windows(3, 10)
    logits, hidden = model(val[:, :-1], output_hidden_states=True)
    assert torch.equal(head(model, hidden[3]), logits)
    lens = TunedLens(model, 32)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.add_(torch.randn_like(t.weight) * 0.1)
    assert lens.translate(hidden[3], 3) is hidden[3]
    logit, tuned = lens_table(model, val), lens_table(model, val, lens)
    for table in (logit, tuned):
        assert len(table) == 4
        assert table[3]["kl_to_final"] == pytest.approx(0.0, abs=1e-6) and table[3]["top1_agreement"] == 1.0
    assert tuned[3]["val_ppl"] == pytest.approx(exit_perplexities(model, val, [3])[3], rel=1e-5)
    assert tuned[1]["kl_to_final"] != pytest.approx(logit[1]["kl_to_final"])


def test_tuned_lens_starts_as_the_logit_lens_and_training_lowers_its_kl():
    model, val = lm(), windows(8, 16)
    lens = TunedLens(model, 32)
    assert [r["kl_to_final"] for r in lens_table(model, val, lens)] == pytest.approx(
        [r["kl_to_final"] for r in lens_table(model, val)], rel=1e-5)
    objective = TunedLensLoss(model, lens)
    assert [n for n, _ in objective.named_parameters()] == [f"lens.{n}" for n, _ in lens.named_parameters()]
    first = objective(val).item()
    opt = torch.optim.Adam(lens.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        objective(val).backward()
        opt.step()
    assert objective(val).item() < first
    assert all(p.grad is None for p in model.parameters())


def test_back_patching_table_is_consistent_and_an_identity_patch_changes_nothing():
    model, val = lm(), windows(16, 10)
    ids = val[:, :-1]
    full, hidden = model(ids, output_hidden_states=True)
    with patch_layer(model, 1, _last_position(hidden[2][:, -1])):
        assert torch.allclose(model(ids), full, atol=1e-6)
    with patch_layer(model, 0, _last_position(hidden[3][:, -1])):
        patched = model(ids)
    assert torch.allclose(patched[:, :-1], full[:, :-1], atol=1e-6)  # causal: only the last position moves
    assert not torch.allclose(patched[:, -1], full[:, -1])
    rows = back_patching(model, val, batch_size=5)
    assert [(r["i"], r["j"]) for r in rows] == [(0, 0), (1, 2), (1, 3), (2, 3)]
    base = rows[0]["accuracy"]
    for r in rows[1:]:
        assert r["accuracy"] - base == pytest.approx(r["fixed"] - r["broken"], abs=1e-6)
    want = (patched[:, -1].argmax(-1) == val[:, -1]).float().mean().item()
    assert rows[2]["accuracy"] == pytest.approx(want)


def test_early_exit_on_llama_fills_the_skipped_kv_cache_from_the_exit_state():
    model = LlamaLM(LlamaConfig(dim=32, depth=3, num_heads=4, num_kv_heads=2, max_seq_len=32)).eval()
    ids = windows(2, 12)[:, :-1]
    cache = model.new_cache(2)
    model(ids[:, :6], cache=cache)
    outs = []
    for t in range(6, 12):
        logits, layers = early_exit.step(model, ids[:, t:t + 1], cache, criterion="confidence", threshold=-1.0)
        assert layers.tolist() == [1, 1]
        outs.append(logits)
    assert cache.lens.tolist() == [12, 12]
    assert torch.allclose(torch.stack(outs, 1), model(ids, exit_layer=1)[:, 6:], atol=1e-4)
    exit_states = model(ids, exit_layer=1, output_hidden_states=True)[1][1]
    block = model.layers[2]
    _, k, v = block.attn.qkv(block.attn_norm(exit_states[:, 6:]), model.positions(2, 6, None, None) + 6)
    assert torch.allclose(cache.k[2][:, 6:12], k, atol=1e-5) and torch.allclose(cache.v[2][:, 6:12], v, atol=1e-5)
    val = windows(2, 13)
    never = early_exit.evaluate(model, val, criterion="cosine", threshold=2.0, prefill=4)
    want = F.cross_entropy(model(val[:, :-1])[:, 4:].reshape(-1, 256), val[:, 5:].reshape(-1))
    assert never["avg_layers"] == 3 and math.isclose(never["val_ppl"], math.exp(want.item()), rel_tol=1e-4)
