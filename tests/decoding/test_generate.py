"""Tree-verified decoding end to end: the tree forward of both model families equals the plain
forward along every branch, the committed cache/state equals plain decoding's, greedy tree
decoding reproduces plain greedy token for token on real pydoc prompts (batch > 1, both
drafters, static and dynamic trees), sampling keeps the target distribution (chi-square), and
bad inputs raise clear errors."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import leanformer
from leanformer.cli import main as cli
from leanformer.decoding import DynamicTree, HiddenTransfer, MedusaHeads, TokenTree
from leanformer.decoding.distill import distill
from leanformer.decoding.hidden_transfer import anchor_nodes, main_chain
from leanformer.decoding.medusa import future_kl, future_kl_per_offset
from leanformer.lab.data import pydoc_text
from leanformer.lab.experiments.tree_decoding import checkpoint_stem, drafters_for
from leanformer.lab.experiments.tree_decoding import main as tree_decoding_main
from leanformer.models import LlamaConfig, LlamaLM, LMConfig, SLABLM
from leanformer.training import sequential_windows, train
from tests.helpers import TORCH_DEVICES as DEVICES
from tests.helpers import assert_two_token_sampling

STATIC = TokenTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]])


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def random_batches(tokens, g):
    while True:
        start = torch.randint(0, len(tokens) - 65, (16,), generator=g)
        yield torch.stack([tokens[s:s + 65] for s in start.tolist()])


@pytest.fixture(scope="module")
def text():
    return pydoc_text()


def trained(model, text, steps=150):
    torch.manual_seed(0)
    train(model, random_batches(text[0], torch.Generator().manual_seed(0)), lm_loss, steps=steps, lr=3e-3,
          evaluate=lambda m: {}, eval_every=steps, desc=type(model).__name__)
    return model.eval()


@pytest.fixture(scope="module")
def llama(text):
    return trained(LlamaLM(LlamaConfig(dim=64, depth=3, num_heads=4, num_kv_heads=2, max_seq_len=512)), text)


@pytest.fixture(scope="module")
def slab(text):
    return trained(SLABLM(LMConfig(dim=64, depth=2, num_heads=2, prepbn_steps=90, dwc_kernel_size=4)), text)


@pytest.fixture(scope="module")
def prompts(text):
    """Real pydoc prompts of different lengths (held-out topics)."""
    val = text[1]
    return [val[s:s + n] for s, n in ((100, 23), (5000, 40), (9000, 7))]


def distilled(drafter, text, steps=60):
    val = sequential_windows(text[1], 64)[:8, :-1]
    distill(drafter, text[0], val, steps=steps, batch=8, length=64, lr=3e-3)
    return drafter.eval()


@pytest.fixture(scope="module")
def drafters(llama, slab, text):
    torch.manual_seed(0)
    return {"llama-medusa": distilled(MedusaHeads(llama, 4), text),
            "llama-ht": distilled(HiddenTransfer(llama, 2, 4), text),
            "slab-medusa": distilled(MedusaHeads(slab, 4), text),
            "slab-ht": distilled(HiddenTransfer(slab, 1, 4), text)}


def new_cache(model, B):
    return model.new_cache(B, 256)


def tree_logits(model, cache, tree):
    """The verifying forward of a token tree over the cache: (logits, final normed hidden states)."""
    return model.tree_logits(cache, tree.tokens.clamp(min=0), tree.mask, tree.depths, tree.parents)


def random_tree(B, T, vocab, g):
    nodes = []
    for b in range(B):
        seq = [(-1, int(torch.randint(0, vocab, (1,), generator=g)))]
        for i in range(1, T):
            seq.append((int(torch.randint(0, i, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))))
        nodes.append(seq)
    return TokenTree.from_nodes(nodes, num_nodes=T)


def branch(tree, b, i):
    out = []
    while i >= 0:
        out.append(int(tree.tokens[b, i]))
        i = int(tree.parents[b, i])
    return out[::-1]


@pytest.mark.parametrize("family", ["llama", "slab"])
def test_tree_forward_equals_plain_forward_on_every_branch(family, request, prompts):
    """Node i's logits equal the full causal forward of prefix + root..i; then the state
    committed for an accepted path equals the state plain decoding of that path leaves."""
    model = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(1)
    B, T = 3, 12
    prefixes = [p[:-1] for p in prompts]
    cache = new_cache(model, B)
    padded = torch.zeros(B, max(len(p) for p in prefixes), dtype=torch.long)
    for b, p in enumerate(prefixes):
        padded[b, :len(p)] = p
    lengths = torch.tensor([len(p) for p in prefixes])
    with torch.no_grad():
        model.prefill(cache, padded, lengths)
        tree = random_tree(B, T, 256, g)
        logits, _ = tree_logits(model, cache, tree)
        for b in range(B):
            for i in range(int(tree.num_nodes[b])):
                path = torch.tensor(branch(tree, b, i))
                full = model(torch.cat([prefixes[b], path])[None])[0, -1]
                torch.testing.assert_close(logits[b, i], full, atol=2e-4, rtol=1e-4)
        # accept a different path per sequence, then decode one more token both ways
        leaves = tree.retrieve_indices()
        accepted = torch.full((B, T), -1, dtype=torch.long)
        num = torch.zeros(B, dtype=torch.long)
        paths = []
        for b in range(B):
            p = leaves[b, b % leaves.shape[1]]
            p = p[p >= 0] if (p >= 0).any() else leaves[b, 0][leaves[b, 0] >= 0]
            accepted[b, :len(p)], num[b] = p, len(p)
            paths.append(torch.tensor([int(tree.tokens[b, i]) for i in p]))
        cache.commit(accepted, num)
        nxt = torch.randint(0, 256, (B,), generator=g)
        step = model(nxt[:, None], cache=cache)[:, 0]
        for b in range(B):
            full = model(torch.cat([prefixes[b], paths[b], nxt[b:b + 1]])[None])[0, -1]
            torch.testing.assert_close(step[b], full, atol=2e-4, rtol=1e-4)


def test_compacted_cache_equals_plain_cache(llama, prompts):
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        tree = random_tree(3, 10, 256, g)
        cache = new_cache(llama, 3)
        prefixes = [p[:-1] for p in prompts]
        padded = torch.zeros(3, 40, dtype=torch.long)
        for b, p in enumerate(prefixes):
            padded[b, :len(p)] = p
        llama.prefill(cache, padded, torch.tensor([len(p) for p in prefixes]))
        logits, _ = tree_logits(llama, cache, tree)
        acc, n, _ = leanformer.ops.verify_tree_greedy(logits, tree.tokens, tree.parents)
        acc[:, 1:] = -1  # whatever greedy accepted, also test a deeper path: the first leaf
        leaves = tree.retrieve_indices()[:, 0]
        n = (leaves >= 0).sum(1)
        acc[:, :leaves.shape[1]] = leaves
        cache.commit(acc, n)
        for b in range(3):
            path = torch.tensor([int(tree.tokens[b, i]) for i in acc[b, :n[b]]])
            plain = llama.new_cache(1, 256)
            llama(torch.cat([prefixes[b], path])[None], cache=plain)
            L = int(plain.lens[0])
            assert int(cache.lens[b]) == L
            for i in range(len(llama.layers)):
                torch.testing.assert_close(cache.k[i][b, :L], plain.k[i][0, :L], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(cache.v[i][b, :L], plain.v[i][0, :L], atol=1e-5, rtol=1e-4)


CASES = [("llama", "llama-medusa", STATIC), ("llama", "llama-medusa", DynamicTree(12, 3)),
         ("llama", "llama-ht", STATIC), ("llama", "llama-ht", DynamicTree(12, 3)),
         ("slab", "slab-medusa", STATIC), ("slab", "slab-medusa", DynamicTree(12, 3)),
         ("slab", "slab-ht", STATIC), ("slab", "slab-ht", DynamicTree(12, 3))]


def on_device(drafter, device):
    """The drafter and its own copy of the base model on ``device`` (the fixtures stay on the CPU)."""
    if device == "cpu":
        return drafter.model, drafter
    d = copy.deepcopy(drafter).to(device)  # the base model is held by reference: deepcopy copies it too
    return d.model.to(device), d


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,drafter,tree", CASES, ids=[f"{d}-{type(t).__name__}" for _, d, t in CASES])
def test_greedy_tree_decoding_equals_plain_greedy(family, drafter, tree, device, drafters, prompts):
    model, drafter = on_device(drafters[drafter], device)
    prompts = [p.to(device) for p in prompts]
    plain = leanformer.generate(model, prompts, max_new_tokens=48)
    out = leanformer.generate(model, prompts, max_new_tokens=48, drafter=drafter, tree=tree)
    for a, b in zip(out.sequences, plain.sequences):
        assert a.tolist() == b.tolist()
    assert plain.tokens_per_forward == 1 and plain.forwards == 48
    assert out.forwards < plain.forwards and out.tokens_per_forward > 1.2  # the drafts do get accepted


@pytest.mark.parametrize("drafter", ["llama-medusa", "slab-ht"])
def test_greedy_tree_decoding_equals_plain_greedy_without_packed_linears(drafter, drafters, prompts):
    """generate packs the linears by default (both sides); with F.linear throughout, tree
    decoding is still token for token plain decoding, and the packed kernels really run by default."""
    name, (model, drafter) = drafter, on_device(drafters[drafter], "cpu")
    plain = leanformer.generate(model, prompts, max_new_tokens=32, pack_linears=False)
    out = leanformer.generate(model, prompts, max_new_tokens=32, drafter=drafter, tree=STATIC, pack_linears=False)
    for a, b in zip(out.sequences, plain.sequences):
        assert a.tolist() == b.tolist()
    with torch.profiler.profile() as prof:
        leanformer.generate(model, prompts[:1], max_new_tokens=4, drafter=drafter, tree=STATIC)
    ran = {e.key for e in prof.key_averages()}
    assert "leanformer::packed_linear" in ran
    assert ("leanformer::packed_swiglu" in ran) == name.startswith("llama")  # LlamaLM's MLP, fused


@pytest.mark.parametrize("drafter", ["llama-medusa", "llama-ht"])
def test_greedy_tree_decoding_of_a_quantized_model_equals_its_plain_greedy(drafter, drafters, prompts):
    """Every Linear of the model, lm_head too, 4-bit (compress.quantize), q/k/v and gate/up
    stacked: tree verification computes each node as a one-token step would, bit for bit (the
    quantized product's rows are independent), so the drafts change nothing but the speed."""
    from leanformer.compress import quantize
    from leanformer.nn import QuantizedLinear
    d = copy.deepcopy(drafters[drafter])  # its model too
    model = d.model
    quantize(model, 4, modules=lambda name, lin: True)
    model.fuse_projections()
    assert type(model.lm_head) is QuantizedLinear and type(model.layers[0].mlp.down) is QuantizedLinear
    plain = leanformer.generate(model, prompts, max_new_tokens=40)
    out = leanformer.generate(model, prompts, max_new_tokens=40, drafter=d, tree=STATIC)
    for a, b in zip(out.sequences, plain.sequences):
        assert a.tolist() == b.tolist()
    assert out.tokens_per_forward > 1.2
    with torch.profiler.profile() as prof:  # the stacked projections run as one op each
        leanformer.generate(model, prompts[:1], max_new_tokens=2)
    calls = {e.key: e.count for e in prof.key_averages()}  # prefill (no head: its logits go unused)
    per_layer = 4 * len(model.layers)  # qkv, o, gate/up, down       # and two steps (with the head)
    assert calls["leanformer::quantized_linear"] == per_layer + 2 * (per_layer + 1)


@pytest.mark.parametrize("family", ["llama", "slab"])
def test_hidden_transfer_drafts_in_decoding_equal_its_training_forward(family, request, drafters, prompts):
    """The pseudo tokens of every anchor (the main chain and, at branch_depth 1, the root's other
    children) in a tree forward over a cached prefix give the same logits as the dense forward
    they are trained with, at the same positions; a node that is no anchor drafts from the
    deepest anchor above it, shifted."""
    model = request.getfixturevalue(family)
    ht = drafters[f"{family}-ht"]
    K = ht.num_future
    assert ht.branch_depth == 1
    prefix, chain_tokens = prompts[1][:30], prompts[1][30:34]  # a chain tree: the root and 3 children
    cache = new_cache(model, 1)
    with torch.no_grad():
        model.prefill(cache, prefix[None], torch.tensor([30]))
        tree = TokenTree.from_nodes([[(-1, int(chain_tokens[0]))] + [(i, int(t)) for i, t in enumerate(chain_tokens[1:])]
                                     + [(0, 200), (4, 201)]])  # a side branch off the root, two deep
        assert main_chain(tree.parents, tree.depths).tolist() == [[0, 1, 2, 3]]
        assert anchor_nodes(tree.parents, tree.depths, 1).tolist() == [[0, 1, 2, 3, 4]]
        logits, feats = ht.tree_forward(cache, tree)
        _, dense = ht.sequence_drafts(torch.cat([prefix, chain_tokens])[None])
        _, side = ht.sequence_drafts(torch.cat([prefix, chain_tokens[:1], torch.tensor([200])])[None])
    for s in range(4):
        torch.testing.assert_close(feats.logits[0, s], dense[0, 30 + s], atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(feats.logits[0, 4], side[0, 31], atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(ht.draft(feats, torch.tensor([2]))[0], feats.logits[0, 2])
    torch.testing.assert_close(ht.draft(feats, torch.tensor([4]))[0], feats.logits[0, 4])
    below = ht.draft(feats, torch.tensor([5]))  # node 5 (depth 2) is no anchor: node 4's drafts, shift 1
    torch.testing.assert_close(below[0, :K - 1], feats.logits[0, 4, 1:])
    assert (below[0, K - 1] == 0).all()
    ht.branch_depth = 0  # the main chain alone: node 4 drafts from the root, shifted
    try:
        with torch.no_grad():
            _, chain_only = ht.tree_forward(cache, tree)
    finally:
        ht.branch_depth = 1
    assert chain_only.anchors.tolist() == [[0, 1, 2, 3]]
    off = ht.draft(chain_only, torch.tensor([4]))
    torch.testing.assert_close(off[0, :K - 1], chain_only.logits[0, 0, 1:])
    assert (off[0, K - 1] == 0).all()


def _small_llama_and_perturbed_transfer(readout: bool):
    """A frozen 4-block LlamaLM (GQA) and a Hidden Transfer after block 2 whose transfers and
    readouts are moved off their identity init, so every path carries a gradient."""
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(dim=64, depth=4, num_heads=4, num_kv_heads=2, max_seq_len=128)).eval()
    model.requires_grad_(False)
    ht = HiddenTransfer(model, layer=2, num_future=3, readout=readout)
    with torch.no_grad():
        for t in ht.transfers:
            t.weight.add_(0.1 * torch.randn_like(t.weight))
            t.bias.normal_(0, 0.1)
        for r in ht.readouts or []:
            r.weight.normal_(0, 0.1)
            r.bias.normal_(0, 0.1)
    return model, ht


@pytest.mark.parametrize("drop_last_attention,readout", [(False, False), (True, False), (False, True)])
def test_hidden_transfer_llama_training_forward_equals_the_dense_tree_forward(drop_last_attention, readout, text):
    """Hidden Transfer's LlamaLM training forward (the real tokens once, frozen; the pseudo tokens
    against their keys and their own chain) gives the logits and transfer gradients of the
    generic tree forward over a dense chain mask with every position an anchor (GQA; a layer
    whose attention was dropped)."""
    model, ht = _small_llama_and_perturbed_transfer(readout)
    if drop_last_attention:
        model.layers[3].attn = None
    ids = text[0][:2 * 37].view(2, 37)
    B, N = ids.shape
    pos = torch.arange(N)
    mask = torch.ones(N, N, dtype=torch.bool).tril().expand(B, N, N)
    # the generic tree forward without a cache: a LlamaLM's layers under the dense tree mask (masked SDPA)
    _, ref = ht._forward(None, ids, mask, pos.expand(B, N), (pos - 1).expand(B, N), pos.expand(B, N))
    teacher, fast = ht.sequence_drafts(ids)
    torch.testing.assert_close(teacher, model(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    grads = []
    for drafts in (ref, fast):
        ht.zero_grad()
        future_kl(drafts, teacher).backward()
        grads.append([t.weight.grad.clone() for t in [*ht.transfers, *(ht.readouts or [])]])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("readout", [False, True])
def test_hidden_transfer_isolated_offsets_train_each_transfer_on_its_own_loss(readout, text):
    """isolate_offsets: the same drafts, and each transfer's (and readout's) gradient is the one of
    its own offset's loss alone in the default forward; the default forward's first transfer is
    also moved by the later offsets' losses (what the option removes)."""
    model, base = _small_llama_and_perturbed_transfer(readout)
    iso = HiddenTransfer(model, layer=2, num_future=3, readout=readout, isolate_offsets=True)
    iso.load_state_dict(base.state_dict())
    ids = text[0][:2 * 37].view(2, 37)
    K = 3

    def grads(ht, offsets):
        ht.zero_grad()
        teacher, drafts = ht.sequence_drafts(ids)
        future_kl_per_offset(drafts, teacher)[list(offsets)].sum().backward()
        return drafts.detach(), [[torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in m.parameters()]
                                 for m in [*ht.transfers, *(ht.readouts or [])]]

    drafts_iso, g_iso = grads(iso, range(K))
    drafts_base, _ = grads(base, range(K))
    torch.testing.assert_close(drafts_iso, drafts_base)
    for k in range(K):
        _, g_own = grads(base, [k])
        for m in [k, K + k] if readout else [k]:  # offset k's transfer and readout
            for a, b in zip(g_iso[m], g_own[m]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # offsets 3.. move the first transfer in the default forward, not with isolated offsets
    _, g_later = grads(base, range(1, K))
    _, g_later_iso = grads(iso, range(1, K))
    assert g_later[0][0].norm() > 1e-3 * g_iso[0][0].norm() and g_later_iso[0][0].abs().max() == 0
    with pytest.raises(ValueError, match="isolate_offsets needs a LlamaLM"):
        HiddenTransfer(SLABLM(LMConfig(vocab_size=256, dim=64, depth=2, num_heads=1)), 1, 2, isolate_offsets=True)


@pytest.mark.parametrize("family", ["llama", "slab"])
def test_hidden_transfer_with_a_readout_decodes_like_plain_greedy(family, llama, slab, drafters, prompts):
    """A readout block changes the drafts, never the output; and it does change the drafts (each
    offset's own block)."""
    base = drafters[f"{family}-ht"]
    model = base.model
    ht = HiddenTransfer(model, base.layer, base.num_future, readout=True)
    ht.load_state_dict({**ht.state_dict(), **base.state_dict()})
    torch.manual_seed(0)
    with torch.no_grad():
        for r in ht.readouts:
            r.weight.normal_(0, 0.05)
    ids = prompts[1][None, :32]
    with torch.no_grad():
        _, plain_drafts = base.sequence_drafts(ids)
        _, drafts = ht.sequence_drafts(ids)
    assert not torch.allclose(drafts, plain_drafts, atol=1e-3)
    plain = leanformer.generate(model, prompts, max_new_tokens=32)
    out = leanformer.generate(model, prompts, max_new_tokens=32, drafter=ht, tree=STATIC)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in plain.sequences]
    assert out.tokens_per_forward > 1


def test_hidden_transfer_static_tree_routes_match_the_per_step_ones(llama, drafters, prompts):
    """A static shape keeps its anchors and draft routes from the first step; each node must
    draft what the same tree without a shape (everything computed per step) drafts, for a
    batch of two."""
    ht = drafters["llama-ht"]
    cache = new_cache(llama, 2)
    with torch.no_grad():
        llama.prefill(cache, torch.stack([prompts[0][:20], prompts[1][:20]]), torch.tensor([20, 17]))
        drafts = torch.randn(2, ht.num_future, llama.config.vocab_size, generator=torch.Generator().manual_seed(0))
        tree = STATIC.build(torch.tensor([5, 9]), drafts)
        assert tree.shape is STATIC
        _, cached = ht.tree_forward(cache, tree)
        _, fresh = ht.tree_forward(cache, dataclasses.replace(tree, shape=None))
    torch.testing.assert_close(cached.logits, fresh.logits)
    for i in range(tree.size):
        for node in (torch.tensor([i, i]), torch.tensor([i, tree.size - 1 - i])):
            torch.testing.assert_close(ht.draft(cached, node), ht.draft(fresh, node))


def test_sequences_finish_independently(llama, drafters, prompts):
    plain = leanformer.generate(llama, prompts, max_new_tokens=40)
    eos = int(plain.sequences[1][5])  # a token that ends sequence 1 early, maybe others too
    out = leanformer.generate(llama, prompts, max_new_tokens=40, drafter=drafters["llama-ht"], tree=STATIC,
                              eos_token_id=eos)
    for a, b in zip(out.sequences, plain.sequences):
        stop = (b == eos).nonzero()
        expect = b[:int(stop[0]) + 1] if len(stop) else b
        assert a.tolist() == expect.tolist()
    assert len(out.sequences[1]) <= 6


def exact_two_token_distribution(model, prompt, **warp):
    """p(t1, t2) under the warped target, computed exactly ``[V, V]``."""
    with torch.no_grad():
        p1 = leanformer.decoding.warp_probs(model(prompt[None])[0, -1], **warp)
        V = p1.shape[0]
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = leanformer.decoding.warp_probs(model(seqs)[:, -1], **warp)
    return p1[:, None] * p2


@pytest.mark.parametrize("family,drafted", [("llama", False), ("llama", True), ("slab", True)])
def test_sampling_keeps_the_target_distribution(family, drafted):
    """Chi-square of the first two sampled tokens (4,000 draws, one batch) against the exact
    warped target: plain sampling and tree sampling alike."""
    torch.manual_seed(3)
    V = 6
    model = (LlamaLM(LlamaConfig(vocab_size=V, dim=32, depth=2, num_heads=2, num_kv_heads=1)) if family == "llama"
             else SLABLM(LMConfig(vocab_size=V, dim=32, depth=2, num_heads=2, norm="layernorm"))).eval()
    with torch.no_grad():  # logits far from uniform, so drafts are sometimes right, sometimes not
        model.embed.weight.mul_(3)
    prompt = torch.tensor([1, 4, 2])
    warp = dict(temperature=0.9, top_k=5)
    expected = exact_two_token_distribution(model, prompt, **warp).flatten()
    drafter = MedusaHeads(model, 2) if drafted else None
    if drafted:
        with torch.no_grad():
            for head in drafter.heads:
                head.weight.normal_(0, 0.5)
    N = 4000
    out = leanformer.generate(model, prompt.expand(N, -1).contiguous(), max_new_tokens=2, drafter=drafter,
                              tree=TokenTree.from_paths([[0], [1], [0, 0], [1, 0]]) if drafted else None,
                              generator=torch.Generator().manual_seed(0), **warp)
    assert_two_token_sampling(out, expected, V)
    if drafted:
        assert out.tokens_per_forward > 1.0  # some drafts were accepted: the rule was exercised


def test_bad_inputs(llama, slab, drafters, prompts):
    with pytest.raises(ValueError, match="needs a drafter"):
        leanformer.generate(llama, prompts, max_new_tokens=4, tree=STATIC)
    with pytest.raises(ValueError, match="deep but the drafter"):
        leanformer.generate(llama, prompts, max_new_tokens=4, drafter=MedusaHeads(llama, 2), tree=STATIC)
    with pytest.raises(ValueError, match="another model"):
        leanformer.generate(slab, prompts, max_new_tokens=4, drafter=drafters["llama-medusa"])
    with pytest.raises(ValueError, match="temperature"):
        leanformer.generate(llama, prompts, max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="top_k/top_p"):
        leanformer.generate(llama, prompts, max_new_tokens=4, top_k=3)
    with pytest.raises(ValueError, match="token ids in 0..255"):
        leanformer.generate(llama, [torch.tensor([3, 300])], max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty"):
        leanformer.generate(llama, [torch.tensor([], dtype=torch.long)], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        leanformer.generate(llama, prompts, max_new_tokens=0)
    with pytest.raises(TypeError, match="HiddenTransfer needs a LlamaLM or a SLABLM"):
        HiddenTransfer(torch.nn.Linear(2, 2), 1, 2)
    with pytest.raises(ValueError, match="layer must be in 1..1"):
        HiddenTransfer(slab, 2, 2)
    with pytest.raises(ValueError, match="layer must be in 1..2"):
        HiddenTransfer(llama, 3, 2)
    with pytest.raises(TypeError, match="LlamaLM or a SLABLM"):
        leanformer.generate(torch.nn.Linear(2, 2), prompts, max_new_tokens=4)


def test_experiment_script_runs_and_reuses_its_checkpoints(tmp_path):
    args = ["experiment", "tree-decoding", "--dim", "64", "--depth", "2", "--lm-steps", "3", "--drafter-steps", "2",
            "--batch", "4", "--length", "32", "--new-tokens", "6", "--prompts", "4", "--prompt-length", "8",
            "--generated-prompts", "8",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert cli(args) == 0
    # a result replaces the last one of its machine class in a folder: the rerun writes to its own
    assert cli(args + ["--reuse", "--ht-all-anchors", "--accept-prompts", "3", "--tree-nodes", "auto",
                       "--out", str(tmp_path / "rerun")]) == 0
    reports = [json.loads(p.read_text()) for out in ("out", "rerun") for p in sorted((tmp_path / out).glob("*.json"))]
    assert len(reports) == 2
    for name in ("llama", "slab"):
        first, second = (r["models"][name] for r in reports)
        assert second["drafters"]["medusa"]["distill_final"] == "reused"
        assert first["val_loss"] == pytest.approx(second["val_loss"])  # the same weights came back
        for batch in ("batch1", "batch4"):
            row = first["results"][batch]
            assert row["plain"]["mean_accepted"] == 1
            for r in row.values():  # each ratio is against the plain runs alternated with it
                assert r["plain_tokens_per_s"] > 0
                assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["plain_tokens_per_s"])
            assert {f"{d}/{t}" for d in ("medusa", "hidden-transfer") for t in ("static", "dynamic", "tuned")} <= set(row)
            assert not any(k.startswith("hidden-transfer-all/") for k in row)
            rerun = second["results"][batch]
            assert {"hidden-transfer-all/static", "hidden-transfer-all/tuned"} <= set(rerun)
        assert "acceptance" not in first
        accept = second["acceptance"]
        assert set(accept) == set(second["results"]["batch1"]) - {"plain"}
        for r in accept.values():  # 3 prompts, 6 new tokens each: at least 2 forwards a prompt, at most 6
            assert len(r["per_prompt"]) == 3 and 6 <= r["forwards"] <= 18
            assert 1 <= r["mean_accepted"] <= 5 and min(r["per_prompt"]) >= 1
            assert r["same_as_plain_greedy"] and r["standard_error"] >= 0
        assert len(first["drafters"]["hidden-transfer"]["tuned_tree_paths"]) == 18  # the default tree size
        for d in ("medusa", "hidden-transfer"):  # --tree-nodes auto: the fastest size timed here, per drafter
            assert "tree_size_tokens_per_s" not in first["drafters"][d]
            rates = {int(n): r for n, r in second["drafters"][d]["tree_size_tokens_per_s"].items()}
            assert sorted(rates) == [4, 7, 11, 15, 19, 27] and min(rates.values()) > 0
            nodes = second["drafters"][d]["tuned_tree_nodes"]
            assert rates[nodes] == max(rates.values())
            assert len(second["drafters"][d]["tuned_tree_paths"]) == nodes - 1


def test_experiment_keeps_a_hidden_transfer_of_another_layer_apart():
    """--ht-layer 3 must train and save its own checkpoint, never reload the half-depth one."""
    model = LlamaLM(LlamaConfig(dim=32, depth=4, num_heads=2, num_kv_heads=1)).eval()
    default, later = drafters_for(model, 2), drafters_for(model, 2, ht_layer=3, ht_branch_depth=0)
    assert default["hidden-transfer"].layer == 2 and later["hidden-transfer"].layer == 3
    assert later["hidden-transfer"].branch_depth == 0
    assert checkpoint_stem(model, "hidden-transfer", default["hidden-transfer"]) == "hidden-transfer"
    assert checkpoint_stem(model, "hidden-transfer", later["hidden-transfer"]) == "hidden-transfer-l3"
    assert checkpoint_stem(model, "medusa", later["medusa"]) == "medusa"
    read = drafters_for(model, 2, ht_readout=True)["hidden-transfer"]
    assert checkpoint_stem(model, "hidden-transfer", read) == "hidden-transfer-ro"
    assert "readouts.0.weight" in read.state_dict() and "readouts.0.weight" not in default["hidden-transfer"].state_dict()
    iso = drafters_for(model, 2, ht_isolate_offsets=True)["hidden-transfer"]
    assert iso.isolate_offsets and checkpoint_stem(model, "hidden-transfer", iso) == "hidden-transfer-iso"

    with pytest.raises(SystemExit) as e:  # the SLAB LM has no isolated-offsets training: refused up front
        tree_decoding_main(["--ht-isolate-offsets", "--models", "llama,slab", "--cache", "/nonexistent"])
    assert e.value.code == 2


@pytest.mark.parametrize("kind", ["medusa", "ht"])
def test_stacked_drafter_weights_follow_training_and_loading(kind):
    """Inference keeps the drafters' stacked [K C, C] weight; it must never go stale."""
    model = LlamaLM(LlamaConfig(dim=32, depth=2, num_heads=2, num_kv_heads=1)).eval().requires_grad_(False)
    drafter = MedusaHeads(model, 3) if kind == "medusa" else HiddenTransfer(model, 1, 3)
    linears = drafter.heads if kind == "medusa" else drafter.transfers
    fresh = lambda: torch.cat([lin.weight for lin in linears])
    with torch.no_grad():
        first = drafter._stacked()[0]
        assert drafter._stacked()[0] is first and torch.equal(first, fresh())  # kept, not restacked
    opt = torch.optim.SGD(drafter.parameters(), lr=0.1)
    w, _ = drafter._stacked()  # grad enabled: stacked in the graph
    assert w.requires_grad
    w.sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(drafter._stacked()[0], fresh()) and not torch.equal(drafter._stacked()[0], first)
    other = MedusaHeads(model, 3) if kind == "medusa" else HiddenTransfer(model, 1, 3)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    drafter.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(drafter._stacked()[0], fresh())
        copied = copy.deepcopy(drafter)
        assert torch.equal(copied._stacked()[0], fresh())
        for p in copied.parameters():
            p.mul_(2)
        assert torch.equal(copied._stacked()[0], 2 * fresh())
