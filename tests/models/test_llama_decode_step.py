"""LlamaLM's one-token decoding step (DecodeStep: stacked q/k/v and gate/up GEMVs over
fuse_projections' shared storage, precomputed RoPE tables, the attention as one
leanformer.ops.decode_attention, or its unfused PyTorch steps where the op does not apply) against
the general path and the full forward; its fallbacks (hooks, unfused weights, the unfused
attention, logged once); generate() unchanged; state_dict unchanged."""
import dataclasses
import logging
from unittest import mock

import pytest
import torch

import leanformer
from leanformer.decoding import MedusaHeads, TokenTree
from leanformer.models import LlamaConfig, LlamaLM, load_pretrained, save_pretrained
from leanformer.models import llama as llama_module
from leanformer.models.llama import LlamaAttention, LlamaBlock, _rotary_tables, rope_tables

CFG = LlamaConfig(dim=48, depth=3, num_heads=6, num_kv_heads=2, max_seq_len=64)


def model(fused=True, **kw):
    torch.manual_seed(0)
    m = LlamaLM(dataclasses.replace(CFG, **kw)).eval()
    return m.fuse_projections() if fused else m


def steps(m, ids, lengths, n, fast=True):
    """Prefill of right-padded prompts, then n one-token steps feeding each sequence's own next
    input token: the stacked step logits [B, n, V]."""
    m.fast_decode_step = fast
    try:
        with torch.inference_mode():
            cache = m.new_cache(ids.shape[0], 40)
            m(ids[:, :int(lengths.max())], cache=cache, lengths=lengths)
            out = []
            for t in range(n):
                tok = ids.gather(1, (lengths + t)[:, None])
                out.append(m(tok, cache=cache)[:, 0])
        return torch.stack(out, 1), cache
    finally:
        del m.fast_decode_step


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lengths", [[9], [9, 5, 12]])
def test_step_matches_general_path_and_full_forward(bias, lengths):
    m = model(qkv_bias=bias)
    lengths = torch.tensor(lengths)
    ids = torch.randint(0, 256, (len(lengths), 24))
    with mock.patch.object(LlamaBlock, "decode_step", autospec=True, side_effect=LlamaBlock.decode_step) as fast, \
            mock.patch.object(llama_module, "decode_attention", wraps=llama_module.decode_attention) as op:
        new, cache = steps(m, ids, lengths, 6)
    assert fast.call_count == op.call_count == 6 * CFG.depth
    old, old_cache = steps(m, ids, lengths, 6, fast=False)
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    for k, k_old in zip(cache.k + cache.v, old_cache.k + old_cache.v):
        torch.testing.assert_close(k, k_old, atol=1e-6, rtol=1e-5)
    assert torch.equal(cache.lens, old_cache.lens)
    for b, n in enumerate(lengths.tolist()):
        full = m(ids[b:b + 1, :n + 6])[0, n:]
        torch.testing.assert_close(new[b], full, atol=1e-5, rtol=1e-5)


def test_fallbacks_compute_the_same():
    """A hook on a projection, or unfused (separately stored) weights: the projections are called
    one by one (their hooks run), the step attention still runs, and computes the same."""
    ids, lengths = torch.randint(0, 256, (2, 20)), torch.tensor([7, 10])
    ref, _ = steps(model(), ids, lengths, 3, fast=False)
    hooked = model()
    calls = []
    hooked.layers[1].attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    with mock.patch.object(LlamaAttention, "step_attention", autospec=True,
                           side_effect=LlamaAttention.step_attention) as fast:
        out, _ = steps(hooked, ids, lengths, 3)
        assert len(calls) == 1 + 3 and fast.call_count == 3 * CFG.depth  # the prefill, then 3 steps
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        fast.reset_mock()
        out, _ = steps(model(fused=False), ids, lengths, 3)
        assert fast.call_count == 3 * CFG.depth
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_tables_are_rotary_factors_bit_for_bit():
    cos, sin = rope_tables(300, 16, 10000.0, "cpu")
    pos = torch.randint(0, 300, (4, 1))
    ref_cos, ref_sin = _rotary_tables(pos, 16, 10000.0)
    assert torch.equal(cos[pos][..., :8], ref_cos[:, :, 0]) and torch.equal(cos[pos][..., 8:], ref_cos[:, :, 0])
    assert torch.equal(sin[pos][..., 8:], ref_sin[:, :, 0]) and torch.equal(sin[pos][..., :8], -ref_sin[:, :, 0])


def test_fuse_projections_keeps_state_dict_training_and_checkpoints(tmp_path):
    plain, fused = model(fused=False, qkv_bias=True), model(qkv_bias=True)
    a, b = plain.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    attn = fused.layers[0].attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
    ids = torch.randint(0, 256, (2, 10))
    for m in (plain, fused):  # gradients reach every projection separately
        m.train()
        m(ids).logsumexp(-1).mean().backward()
    for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)
    save_pretrained(fused.eval(), str(tmp_path))
    torch.testing.assert_close(load_pretrained(str(tmp_path))(ids), fused(ids))
    fused.double()  # parameters replaced one by one: no longer stacked, still right
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain.double()(ids))


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]])
def test_generate_unchanged(prompts):
    m = model(vocab_size=64)  # a small vocabulary: greedy paths with repeats, several branches
    new = leanformer.generate(m, prompts, max_new_tokens=12)
    m.fast_decode_step = False
    old = leanformer.generate(m, prompts, max_new_tokens=12)
    del m.fast_decode_step
    assert [s.tolist() for s in new.sequences] == [s.tolist() for s in old.sequences]
    tree = TokenTree.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    drafted = leanformer.generate(m, prompts, max_new_tokens=12, drafter=MedusaHeads(m, 3), tree=tree)
    assert [s.tolist() for s in drafted.sequences] == [s.tolist() for s in new.sequences]


@pytest.mark.parametrize("lengths", [[9], [9, 5, 12]])
def test_unfused_attention_computes_the_same_and_is_logged_once(lengths, caplog):
    """Where decode_attention does not apply (here: forced), the
    step's attention runs as PyTorch ops, saying why once."""
    m, lengths = model(), torch.tensor(lengths)
    ids = torch.randint(0, 256, (len(lengths), 24))
    fused, cache = steps(m, ids, lengths, 5)
    llama_module._LOGGED_UNFUSED.clear()
    with mock.patch.object(llama_module, "_unfused_reason", return_value="forced by the test"), \
            mock.patch.object(llama_module, "decode_attention") as op, \
            caplog.at_level(logging.INFO, logger="leanformer.models.llama"):
        unfused, unfused_cache = steps(m, ids, lengths, 5)
    assert op.call_count == 0
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["LlamaAttention decode step: unfused attention (forced by the test)"]
    torch.testing.assert_close(unfused, fused, atol=1e-5, rtol=1e-5)
    for k, k_unfused in zip(cache.k + cache.v, unfused_cache.k + unfused_cache.v):
        torch.testing.assert_close(k, k_unfused, atol=1e-6, rtol=1e-5)


def test_unfused_reasons():
    x = torch.zeros(2, 40)
    cache = torch.zeros(2, 8, 2, 5)
    assert llama_module._unfused_reason(x, cache, cache) is None
    assert llama_module._unfused_reason(x.double(), cache.double(), cache.double()) == "torch.float64 activations"
    assert llama_module._unfused_reason(x, cache.bfloat16(), cache) == \
        "a torch.bfloat16 cache for torch.float32 activations"
    assert llama_module._unfused_reason(x.requires_grad_(), cache, cache) == "gradients needed"
    assert llama_module._unfused_reason(x.to("meta"), cache.to("meta"), cache.to("meta")) == \
        "no decode_attention kernel on meta"


@pytest.mark.skipif(not llama_module._OPENMP, reason="the thread count is switched under OpenMP only")
def test_step_attention_runs_on_one_thread_and_restores_the_count():
    """decode_attention itself stays on the calling thread at decoding sizes (no switch); the
    unfused attention switches to one thread around SDPA and back."""
    m, ids, lengths = model(), torch.randint(0, 256, (1, 12)), torch.tensor([8])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.object(torch, "set_num_threads", wraps=torch.set_num_threads) as set_threads:
            steps(m, ids, lengths, 2)
        assert set_threads.call_count == 0
        with mock.patch.object(torch, "set_num_threads", wraps=torch.set_num_threads) as set_threads, \
                mock.patch.object(llama_module, "_unfused_reason", return_value="forced by the test"):
            steps(m, ids, lengths, 2)
        assert [c.args for c in set_threads.call_args_list] == [(1,), (2,)] * 2 * CFG.depth
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("prompts", [[[5, 6, 7, 8, 9]], [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]])
def test_packed_single_rows_still_attend_with_the_fused_op(prompts):
    """Under packed_linears (single rows packed, the default), q/k/v cannot run as one stacked
    GEMV; the step calls the three packed projections and still attends with decode_attention,
    computing the tokens of the unpacked step and of the general path."""
    m = model(vocab_size=64)
    calls = []
    real = llama_module.decode_attention
    with mock.patch.object(llama_module, "decode_attention", lambda *a: calls.append(1) or real(*a)):
        packed = leanformer.generate(m, prompts, max_new_tokens=12)
    assert calls, "the packed one-row step did not use decode_attention"
    plain = leanformer.generate(m, prompts, max_new_tokens=12, pack_linears=False)
    m.fast_decode_step = False
    general = leanformer.generate(m, prompts, max_new_tokens=12)
    del m.fast_decode_step
    assert [s.tolist() for s in packed.sequences] == [s.tolist() for s in plain.sequences] \
        == [s.tolist() for s in general.sequences]
