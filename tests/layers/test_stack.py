"""The layer-stack mechanism (leanformer.layers.stack) on every model family it supports:
exits, hidden states, skip / patch / drop hooks that leave no state behind, bad indices."""
import pytest
import torch

from leanformer import fold_batchnorm
from tests.helpers import TORCH_DEVICES as DEVICES
from leanformer.layers import (attention_slots, drop_modules, forward, head, num_layers, patch_layer,
                               skip_layers, without_modules)
from leanformer.models import BertConfig, BertEncoder, LlamaConfig, LlamaLM, LMConfig, SLABLM


def lms(device):
    """The SLAB LM, its softmax + LayerNorm twin and SLA + LayerNorm, tiny, with BN statistics."""
    out = []
    for cfg in (LMConfig(dim=32, depth=3, num_heads=2), LMConfig(dim=32, depth=3, num_heads=2).twin(),
                LMConfig(dim=32, depth=3, num_heads=2, norm="layernorm")):
        model = SLABLM(cfg).to(device)
        model.train()(torch.randint(0, 256, (2, 12), device=device))  # running statistics for eval
        out.append(model.eval())
    return out + [llama(device)]


def llama(device):
    return LlamaLM(LlamaConfig(dim=32, depth=3, num_heads=4, num_kv_heads=2, max_seq_len=32)).to(device).eval()


def new_cache(model, batch=1):
    return model.new_cache(batch) if isinstance(model, LlamaLM) else model.new_cache()


def bert(device):
    return BertEncoder(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64)).to(device).eval()


def snapshot(model):
    return ([(n, t.clone()) for n, t in model.state_dict().items()], repr(model),
            [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()])


def assert_same_state(model, snap):
    state, text, hooks = snapshot(model)
    assert text == snap[1]
    assert [n for n, _ in state] == [n for n, _ in snap[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(state, snap[0]))
    assert all(not h and not p for _, h, p in hooks)


@pytest.mark.parametrize("device", DEVICES)
def test_exit_at_the_last_layer_is_the_full_model_and_hidden_states_line_up(device):
    ids = torch.randint(0, 256, (2, 9), device=device)
    for model in lms(device):
        full = model(ids)
        logits, hidden = model(ids, exit_layer=num_layers(model), output_hidden_states=True)
        assert torch.equal(logits, full)
        assert len(hidden) == 4 and torch.equal(hidden[0], model.embed(ids))
        assert torch.equal(model(ids, exit_layer=0), head(model, model.embed(ids)))
        for l in range(4):
            lo, hs = model(ids, exit_layer=l, output_hidden_states=True)
            assert len(hs) == l + 1 and all(torch.equal(a, b) for a, b in zip(hs, hidden))
            assert torch.allclose(lo, head(model, hidden[l]), atol=1e-6)
    enc = bert(device)
    ids = torch.randint(1, 50, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    last, hs = enc(ids, mask, output_hidden_states=True)
    out, ours = forward(enc, ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(out, last) and all(torch.equal(a, b) for a, b in zip(ours, hs))
    assert torch.equal(forward(enc, ids, attention_mask=mask, exit_layer=2), hs[2])


@pytest.mark.parametrize("family", ["slab", "llama"])
def test_exit_layer_with_a_cache_matches_the_exit_without_one(family):
    model = lms("cpu")[0] if family == "slab" else llama("cpu")
    ids = torch.randint(0, 256, (1, 10))
    cache = new_cache(model)
    steps = [model(ids[:, :6], cache=cache, exit_layer=2)] + [model(ids[:, t:t + 1], cache=cache, exit_layer=2)
                                                              for t in range(6, 10)]
    assert torch.allclose(torch.cat(steps, 1), model(ids, exit_layer=2), atol=1e-4)


def test_skip_and_patch_change_the_output_and_leave_no_state_behind():
    ids = torch.randint(0, 256, (2, 9))
    for model in lms("cpu") + [bert("cpu")]:
        if isinstance(model, BertEncoder):
            ids = torch.randint(1, 50, (2, 9))
        snap, full = snapshot(model), forward(model, ids)
        _, hidden = forward(model, ids, output_hidden_states=True)
        with skip_layers(model, [1]):
            skipped = forward(model, ids)
            assert not any(n.startswith("blocks.1.") for n, _ in model.named_parameters())
        assert not torch.allclose(skipped, full)
        assert torch.allclose(skipped, _from(model, hidden[1], 2), atol=1e-5)
        # Skipping the last block equals exiting before it.
        with skip_layers(model, 2):
            assert torch.allclose(forward(model, ids), forward(model, ids, exit_layer=2), atol=1e-6)
        # Writing hidden state 2 into block 0's output runs blocks 1 and 2 on it.
        with patch_layer(model, 0, lambda y: hidden[2]):
            patched = forward(model, ids)
        assert torch.allclose(patched, _from(model, hidden[2], 1), atol=1e-5)
        assert_same_state(model, snap)
        assert torch.equal(forward(model, ids), full)


def _from(model, x, first_block):
    """Blocks ``first_block..L-1`` then the head on ``x``, by hand."""
    if isinstance(model, LlamaLM):
        positions = model.positions(*x.shape[:2], None, None)
        for block in list(model.layers)[first_block:]:
            x = block(x, positions)
        return model.lm_head(model.norm(x))
    for block in list(model.blocks)[first_block:]:
        x = block(x) if isinstance(model, BertEncoder) else block(x, cache=None, mask=None)
    return head(model, x)


def test_hooks_are_removed_when_the_body_raises():
    model = lms("cpu")[0]
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with skip_layers(model, [0, 2]), patch_layer(model, 1, lambda y: y * 2), without_modules(model, [1], [0]):
            raise RuntimeError("boom")
    assert_same_state(model, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_dropping_nothing_changes_nothing(device):
    ids = torch.randint(0, 256, (2, 9), device=device)
    for model in lms(device):
        before = model(ids)
        assert torch.equal(drop_modules(model)(ids), before)
        with without_modules(model):
            assert torch.equal(model(ids), before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["slab", "llama"])
def test_dropped_modules_lose_their_cache_and_decoding_matches_the_dropped_forward(device, family):
    model = lms(device)[0] if family == "slab" else llama(device)
    ids = torch.randint(0, 256, (1, 14), device=device)
    n_params = sum(p.numel() for p in model.parameters())
    full = model(ids)
    n_slots = len(new_cache(model).layers if family == "slab" else new_cache(model).k)
    drop_modules(model, attention=[0, 2], mlp=[1])
    assert attention_slots(model) == [None, 0, None]
    blocks = model.blocks if family == "slab" else model.layers
    assert blocks[0].attn is None and blocks[1].mlp is None
    assert sum(p.numel() for p in model.parameters()) < n_params
    dropped = model(ids)
    assert not torch.allclose(dropped, full)
    cache = new_cache(model)
    assert n_slots == 3 and len(cache.layers if family == "slab" else cache.k) == 1
    steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 14)]
    assert torch.allclose(torch.cat(steps, 1), dropped, atol=1e-4)
    with pytest.raises(ValueError, match="the attention of layer 0 is already dropped"):
        drop_modules(model, attention=[0])
    if family == "slab":
        assert model.blocks[0].norm1 is None and cache.layers[0].length == 14
        with pytest.raises(ValueError, match="cache has 3 layers, the model 1 attention layers"):
            model(ids, cache=SLABLM(model.config).new_cache())
    else:
        assert model.layers[0].attn_norm is None and int(cache.lens[0]) == 14
        with pytest.raises(ValueError, match="cache must have 1 layers"):
            model(ids, cache=LlamaLM(model.config).new_cache(1))


def test_without_modules_restores_the_model():
    model = lms("cpu")[0]
    ids = torch.randint(0, 256, (2, 9))
    snap, full = snapshot(model), model(ids)
    with without_modules(model, attention=[1], mlp=[0, 2]):
        assert len(model.new_cache().layers) == 2
        inside = model(ids)
    assert not torch.allclose(inside, full)
    assert_same_state(model, snap)
    assert torch.equal(model(ids), full)
    assert torch.equal(drop_modules(model, attention=[1], mlp=[0, 2])(ids), inside)


def test_bad_layer_indices_raise_naming_the_index_and_the_range():
    model = lms("cpu")[0]
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(IndexError, match=r"exit_layer 4 is out of range: the model has 3 layers, valid exit_layers are 0\.\.3"):
        model(ids, exit_layer=4)
    with pytest.raises(IndexError, match=r"exit_layer -1 is out of range"):
        forward(model, ids, exit_layer=-1)
    with pytest.raises(IndexError, match=r"layer 3 is out of range: the model has 3 layers, valid layers are 0\.\.2"):
        with skip_layers(model, [0, 3]):
            pass
    with pytest.raises(IndexError, match=r"layer 5 is out of range"):
        with patch_layer(model, 5, lambda y: y):
            pass
    with pytest.raises(IndexError, match=r"attention layer 7 is out of range"):
        drop_modules(model, attention=[7])
    with pytest.raises(IndexError, match=r"mlp layer -2 is out of range"):
        with without_modules(model, mlp=[-2]):
            pass
    assert len(model.new_cache().layers) == 3  # nothing was dropped by the failed calls
    with pytest.raises(TypeError, match="does not implement the layer-stack protocol"):
        forward(torch.nn.Linear(2, 2), ids)


def test_bert_drop_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="post-norm BERT"):
        drop_modules(bert("cpu"), attention=[0])


def test_a_model_with_dropped_modules_still_folds_its_batchnorms():
    model = lms("cpu")[0]  # the SLAB LM: PRepBN everywhere
    drop_modules(model, attention=[1], mlp=[0])
    ids = torch.randint(0, 256, (2, 9))
    before = model(ids)
    folded = fold_batchnorm(model)
    assert torch.allclose(folded(ids), before, atol=1e-5)
