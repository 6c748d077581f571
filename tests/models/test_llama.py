"""LlamaLM: causal forward, KV cache with a length per sequence (prefill + steps == full forward,
variable-length prompts in one batch), GQA, tied/untied head, save/load, bad inputs."""
import pytest
import torch

from leanformer.models import KVCache, LlamaConfig, LlamaLM, load_pretrained, save_pretrained
from leanformer.models.llama import rotary_at, write_slots
from leanformer.nn.softmax_attention import rotary

CFG = LlamaConfig(dim=48, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=64)


def model(**kw):
    import dataclasses

    torch.manual_seed(0)
    return LlamaLM(dataclasses.replace(CFG, **kw)).eval()


def test_rotary_at_matches_contiguous_rotary():
    x = torch.randn(2, 7, 3, 8)
    pos = torch.arange(5, 12).expand(2, 7)
    torch.testing.assert_close(rotary_at(x, pos, 10000.0), rotary(x, offset=5))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tie", [True, False])
def test_prefill_then_steps_equals_full_forward(kv_heads, tie):
    m = model(num_kv_heads=kv_heads, tie_embeddings=tie)
    ids = torch.randint(0, 256, (3, 19))
    full = m(ids)
    cache = m.new_cache(3, 32)
    with torch.no_grad():
        parts = [m(ids[:, :11], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(11, 19)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.lens.tolist() == [19, 19, 19]
    # chunks of several tokens at once equal single steps too
    cache2 = m.new_cache(3, 32)
    with torch.no_grad():
        parts = [m(ids[:, a:b], cache=cache2) for a, b in ((0, 5), (5, 12), (12, 19))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_tied_and_untied_head():
    m = model(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight
    m = model(tie_embeddings=False)
    assert m.lm_head.weight is not m.embed.weight


def test_variable_length_prompts_in_one_batch():
    """Right-padded prompts of different lengths prefilled together, then stepped together,
    give each sequence exactly the logits of running it alone."""
    m = model()
    lens = [5, 13, 9]
    prompts = [torch.randint(0, 256, (n,)) for n in lens]
    cont = torch.randint(0, 256, (3, 4))
    padded = torch.zeros(3, max(lens), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    cache = m.new_cache(3, 32)
    with torch.no_grad():
        pre = m(padded, cache=cache, lengths=torch.tensor(lens))
        assert cache.lens.tolist() == lens
        steps = [m(cont[:, t:t + 1], cache=cache) for t in range(4)]
        for b, p in enumerate(prompts):
            alone = m(torch.cat([p, cont[b]])[None])
            torch.testing.assert_close(pre[b, :len(p)], alone[0, :len(p)], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(torch.cat([s[b] for s in steps]), alone[0, len(p):], atol=1e-5, rtol=1e-4)


def test_a_quantized_batch_decodes_each_prompt_as_alone_bit_for_bit():
    """Prompts of different lengths in one batch: each sequence's cache after the prefill, and
    its greedy tokens, are exactly those of the prompt alone. The prefill's attention runs each
    sequence over its own slots (a masked batched call sums over a padded key range, and
    quantized layers round activations to int8, which turns last-bit differences into other
    tokens); the quantized GEMMs' rows and the decoding attention are independent of the batch."""
    import leanformer
    from leanformer.compress import quantize
    torch.manual_seed(0)
    m = LlamaLM(LlamaConfig(vocab_size=256, dim=64, depth=3, num_heads=4, num_kv_heads=2, max_seq_len=128)).eval()
    quantize(m, 4, modules=lambda name, lin: True)
    m.fuse_projections()
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 13, 9, 13)]
    padded = torch.zeros(4, 13, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    with torch.inference_mode():
        cache = m.new_cache(4, 32)
        m.prefill(cache, padded, torch.tensor([len(p) for p in prompts]))
        for b, p in enumerate(prompts):
            alone = m.new_cache(1, 32)
            m.prefill(alone, p[None], torch.tensor([len(p)]))
            for layer in range(3):
                assert torch.equal(cache.k[layer][b, :len(p)], alone.k[layer][0, :len(p)])
                assert torch.equal(cache.v[layer][b, :len(p)], alone.v[layer][0, :len(p)])
        one = m.new_cache(1, 32)  # a batch of one, padded: its own 5 slots too
        m.prefill(one, padded[:1], torch.tensor([5]))
        for layer in range(3):
            assert torch.equal(one.k[layer][0, :5], cache.k[layer][0, :5])
    batch = leanformer.generate(m, prompts, max_new_tokens=24)
    for p, s in zip(prompts, batch.sequences):
        assert s.tolist() == leanformer.generate(m, [p], max_new_tokens=24).sequences[0].tolist()


def test_trains():
    m = model()
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(15):
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load(tmp_path, tie):
    m = model(tie_embeddings=tie)
    save_pretrained(m, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    assert isinstance(loaded, LlamaLM) and loaded.config == m.config
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(loaded(ids), m(ids))
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


def test_bad_inputs():
    m = model()
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="cache must have"):
        m(torch.zeros(2, 3, dtype=torch.long), cache=m.new_cache(3))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.zeros(2, 3, dtype=torch.long), cache=m.new_cache(2), lengths=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="do not fit"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=m.new_cache(1, 8))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaLM(LlamaConfig(dim=48, num_heads=4, num_kv_heads=3))
    with pytest.raises(ValueError, match="tree_mask and depths"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=m.new_cache(1), tree_mask=torch.ones(3, 3, dtype=torch.bool))


def test_training_script(tmp_path):
    import json

    from leanformer.cli import main as cli

    assert cli(["train", "llama-text", "--steps", "3", "--batch", "4", "--length", "32", "--eval-windows", "4",
                "--out", str(tmp_path), "--save", str(tmp_path / "model")]) == 0
    s = json.loads(next(tmp_path.glob("*.json")).read_text())["summary"]
    assert s["cached_vs_full_max_abs_logit_diff"] < 1e-4
    assert 1 < s["final"]["val_ppl"] < 400
    assert isinstance(load_pretrained(str(tmp_path / "model")), LlamaLM)


def test_rotary_tables_are_reused_only_for_the_same_unchanged_positions():
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5).expand(2, 5).clone()

    def fresh(p):
        inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        ang = p.float()[..., None] * inv
        cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    assert torch.allclose(rotary_at(x, pos, 10000.0), fresh(pos))
    pos.add_(3)  # in place: the cached tables must not be used
    assert torch.allclose(rotary_at(x, pos, 10000.0), fresh(pos))
    other = pos + 1
    assert torch.allclose(rotary_at(x, other, 10000.0), fresh(other))
    assert not torch.allclose(rotary_at(x, pos, 500.0), fresh(pos))  # another base, other tables
    with torch.inference_mode():  # inference tensors keep no version counter
        ipos = torch.arange(5).expand(2, 5).clone()
        assert torch.allclose(rotary_at(x, ipos, 10000.0), fresh(ipos))
        ipos.add_(3)
        assert torch.allclose(rotary_at(x, ipos, 10000.0), fresh(ipos))


@pytest.mark.parametrize("lens", [[3, 3], [0, 5], [7, 2]])
def test_write_slots_writes_each_sequence_at_its_length(lens):
    # one length for all: slice copies (no index_put: it opens an OpenMP region); otherwise index_put
    k_cache, v_cache = torch.zeros(2, 12, 3, 4), torch.zeros(2, 12, 3, 4)
    k, v = torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4)
    write_slots(k_cache, v_cache, torch.tensor(lens), k, v)
    for b, n in enumerate(lens):
        assert torch.equal(k_cache[b, n:n + 4], k[b]) and torch.equal(v_cache[b, n:n + 4], v[b])
        assert not k_cache[b, :n].any() and not k_cache[b, n + 4:].any()
    with pytest.raises(ValueError, match="the KV cache holds 12 positions"):
        write_slots(k_cache, v_cache, torch.tensor([9, 0]), k, v)
