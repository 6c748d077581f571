"""LookupDrafter and NgramTable: the n-gram counts equal a brute-force count (fuzz), the
context index finds the most recent occurrence of the longest match, and decoding with lookup
drafts is token for token the model's plain greedy output (both model families, a batch of
prompts of different lengths, an end token), keeps the sampling distribution, and bad inputs
raise errors naming the argument."""
import random
from collections import Counter

import pytest
import torch

import leanformer
from leanformer.decoding import LookupDrafter, NgramTable
from leanformer.models import LlamaConfig, LlamaLM, LMConfig, SLABLM
from tests.helpers import assert_two_token_sampling


def brute_next(seqs, n):
    """{n-gram tuple: most frequent next token, the smallest id among equals}."""
    counts = Counter((tuple(s[i:i + n]), s[i + n]) for s in seqs for i in range(len(s) - n))
    best = {}
    for (gram, nxt), c in counts.items():
        if gram not in best or (c, -nxt) > (counts[(gram, best[gram])], -best[gram]):
            best[gram] = nxt
    return best


def brute_next_token(seqs, max_ngram, context):
    for n in range(min(max_ngram, len(context)), 0, -1):
        t = brute_next(seqs, n).get(tuple(context[len(context) - n:]))
        if t is not None:
            return t
    return None


@pytest.mark.parametrize("seed", range(6))
def test_ngram_table_equals_a_brute_force_count(seed):
    rng = random.Random(seed)
    V = rng.choice([3, 7, 50])
    seqs = [[rng.randrange(V) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(1, 8))]
    max_ngram = rng.randrange(1, 4)
    table = NgramTable.from_sequences([torch.tensor(s, dtype=torch.long) for s in seqs], vocab_size=V,
                                      max_ngram=max_ngram)
    V_codes = [V ** j for j in range(max_ngram)]
    for n in range(1, max_ngram + 1):
        expect = brute_next(seqs, n)
        got = {tuple((code // V_codes[n - 1 - j]) % V for j in range(n)): t
               for code, t in table.tables[n - 1].items()}
        assert got == expect
    for _ in range(30):
        ctx = [rng.randrange(V) for _ in range(rng.randrange(0, 5))]
        assert table.next_token(ctx) == brute_next_token(seqs, max_ngram, ctx)
        chain = table.continue_chain(ctx, 4)
        expect, c = [], list(ctx)
        while len(expect) < 4 and (t := brute_next_token(seqs, max_ngram, c)) is not None:
            expect.append(t)
            c.append(t)
        assert chain == expect


def test_ngram_table_ties_backoff_and_limits():
    table = NgramTable.from_sequences([[1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 5, 6]], vocab_size=8, max_ngram=2)
    assert table.continue_chain([9, 2, 3], 3) == [5, 6]  # (2, 3) -> 5 twice, 4 once; then (3, 5) -> 6
    assert table.next_token([7, 3]) == 5  # no (7, 3): backs off to (3,) -> 4 once, 5 twice
    assert table.next_token([0]) is None and table.continue_chain([], 3) == []
    assert NgramTable.from_sequences([[4, 1], [4, 0]], vocab_size=5).next_token([4]) == 0  # tie: smaller id
    assert NgramTable.from_sequences([[]], vocab_size=5).next_token([1]) is None
    with pytest.raises(ValueError, match="max_ngram up to 2"):
        NgramTable.from_sequences([[1, 2]], vocab_size=128256, max_ngram=3)
    with pytest.raises(ValueError, match="max_ngram must be >= 1"):
        NgramTable.from_sequences([[1, 2]], vocab_size=8, max_ngram=0)
    with pytest.raises(ValueError, match="token ids in 0..7"):
        NgramTable.from_sequences([[1, 8]], vocab_size=8)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"vocab_size must be >= 1, got {bad}"):
            NgramTable.from_sequences([[0]], vocab_size=bad)
    assert NgramTable.from_sequences([[0, 0, 0]], vocab_size=1, max_ngram=5).continue_chain([0], 2) == [0, 0]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaLM(LlamaConfig(vocab_size=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, max_seq_len=256)).eval()


def brute_draft(tokens, k, max_ngram, min_ngram):
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # the most recent earlier occurrence
            if tokens[start:start + n] == suffix:
                ext = list(tokens)  # what followed, copied on into the draft where it reaches the end
                for i in range(k):
                    ext.append(ext[start + n + i])
                return ext[len(tokens):]
    return []


@pytest.mark.parametrize("seed", range(4))
def test_context_draft_is_the_most_recent_longest_match(llama, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    drafter = LookupDrafter(llama, num_future=3, max_ngram=3, min_ngram=rng.choice([1, 2]))
    state = drafter.start(prompts)
    for _ in range(20):
        b = rng.randrange(3)
        state.extend(b, [rng.randrange(5) for _ in range(rng.randrange(1, 4))])
        for s in range(3):
            assert state.draft(s) == brute_draft(state.tokens[s], 3, 3, drafter.min_ngram)
    tree = state.tree([2, 0])
    for row, s in enumerate([2, 0]):
        chain = [state.tokens[s][-1]] + state.draft(s)
        n = len(chain)
        assert tree.tokens[row, :n].tolist() == chain and int(tree.num_nodes[row]) == n
        assert tree.parents[row, :n].tolist() == list(range(-1, n - 1))


def test_datastore_drafts_where_the_context_has_no_match(llama):
    table = NgramTable.from_sequences([[7, 8, 9, 10, 11], [8, 5, 6]], vocab_size=64)
    state = LookupDrafter(llama, num_future=4, datastore=table).start([[1, 2, 3, 1, 2, 7], [5, 7, 8, 5]])
    assert state.draft(0) == [8, 9, 10, 11]  # no earlier 7 in the context: the table's chain
    assert state.draft(1) == [7, 8, 5, 7]  # the context's copy, on through its own start (a loop)
    repeat = LookupDrafter(llama, num_future=6).start([[1, 2, 1, 2, 1, 2], [5, 5, 5, 5]])
    assert repeat.draft(0) == [1, 2, 1, 2, 1, 2] and repeat.draft(1) == [5] * 6  # a loop drafts k tokens
    state = LookupDrafter(llama, num_future=4, datastore=table, min_ngram=2).start([[1, 2, 3, 1]])
    assert state.draft(0) == []  # a 1-token match is below min_ngram and the table has no (1,)


def models():
    torch.manual_seed(1)
    yield "llama", LlamaLM(LlamaConfig(vocab_size=48, dim=32, depth=2, num_heads=4, num_kv_heads=2,
                                       max_seq_len=256)).eval()
    torch.manual_seed(1)
    yield "slab", SLABLM(LMConfig(vocab_size=48, dim=32, depth=2, num_heads=2, dwc_kernel_size=4,
                                  norm="layernorm")).eval()


@pytest.mark.parametrize("name,model", list(models()), ids=["llama", "slab"])
def test_greedy_lookup_decoding_equals_plain_greedy(name, model):
    """Repetitive prompts (a random model's greedy output also tends to loop): the drafts are
    often right, never change a token."""
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, 48, (9,), generator=g)
    prompts = [base.repeat(3), torch.cat([base[:4], base, base[:6]]), torch.randint(0, 48, (5,), generator=g)]
    plain = leanformer.generate(model, prompts, max_new_tokens=40)
    table = NgramTable.from_sequences([torch.cat([p, s]) for p, s in zip(prompts, plain.sequences)], vocab_size=48)
    for drafter in (LookupDrafter(model, 4), LookupDrafter(model, 3, min_ngram=2, datastore=table)):
        out = leanformer.generate(model, prompts, max_new_tokens=40, drafter=drafter)
        assert [s.tolist() for s in out.sequences] == [s.tolist() for s in plain.sequences]
        assert out.forwards < plain.forwards and out.tokens_per_forward > 1.2
    eos = int(plain.sequences[1][7])
    for drafter in (LookupDrafter(model, 4), LookupDrafter(model, 3, min_ngram=2, datastore=table)):
        out = leanformer.generate(model, prompts, max_new_tokens=40, drafter=drafter, eos_token_id=eos)
        for a, b in zip(out.sequences, plain.sequences):
            stop = (b == eos).nonzero()
            assert a.tolist() == (b[:int(stop[0]) + 1] if len(stop) else b).tolist()


def test_lookup_decoding_of_a_quantized_model_equals_its_plain_greedy(llama):
    from leanformer.compress import quantize
    import copy
    model = copy.deepcopy(llama)
    quantize(model, 4, modules=lambda name, lin: True)
    model.fuse_projections()
    prompt = torch.arange(10, 20).repeat(3)
    plain = leanformer.generate(model, [prompt], max_new_tokens=32)
    out = leanformer.generate(model, [prompt], max_new_tokens=32, drafter=LookupDrafter(model, 5))
    assert out.sequences[0].tolist() == plain.sequences[0].tolist() and out.tokens_per_forward > 1.2


def test_sampling_with_lookup_drafts_keeps_the_target_distribution():
    """Chi-square of the first two sampled tokens against the exact warped target; the prompt
    repeats, so the context drafts are sometimes accepted, sometimes not."""
    torch.manual_seed(3)
    V = 6
    model = LlamaLM(LlamaConfig(vocab_size=V, dim=32, depth=2, num_heads=2, num_kv_heads=1)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(3)
    prompt = torch.tensor([1, 4, 2, 1, 4, 2, 1])
    warp = dict(temperature=0.9, top_k=5)
    with torch.no_grad():
        p1 = leanformer.decoding.warp_probs(model(prompt[None])[0, -1], **warp)
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
        expected = (p1[:, None] * leanformer.decoding.warp_probs(model(seqs)[:, -1], **warp)).flatten()
    N = 4000
    out = leanformer.generate(model, prompt.expand(N, -1).contiguous(), max_new_tokens=2,
                              drafter=LookupDrafter(model, 2), generator=torch.Generator().manual_seed(0), **warp)
    assert_two_token_sampling(out, expected, V)
    assert out.tokens_per_forward > 1.0  # drafts were accepted: the rule ran


def test_bad_inputs(llama):
    other = LlamaLM(LlamaConfig(vocab_size=64, dim=32, depth=1, num_heads=4, num_kv_heads=2)).eval()
    with pytest.raises(ValueError, match="num_future must be >= 1"):
        LookupDrafter(llama, 0)
    with pytest.raises(ValueError, match="min_ngram"):
        LookupDrafter(llama, 2, max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="vocab_size 8 is not the model's 64"):
        LookupDrafter(llama, 2, datastore=NgramTable.from_sequences([[1, 2]], vocab_size=8))
    with pytest.raises(ValueError, match="pass no tree"):
        leanformer.generate(llama, [[1, 2]], max_new_tokens=2, drafter=LookupDrafter(llama, 2),
                            tree=leanformer.decoding.TokenTree.from_paths([[0]]))
    with pytest.raises(ValueError, match="built for another model"):
        leanformer.generate(llama, [[1, 2]], max_new_tokens=2, drafter=LookupDrafter(other, 2))
