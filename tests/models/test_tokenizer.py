"""load_tokenizer: the byte-level BPE of a GGUF file's metadata and a Hugging Face folder's
tokenizer.json, against transformers' tokenizer of the same files (ids, decoding, chat template,
special tokens), on the real SmolLM2 GGUF and on a tiny GGUF the test writes; the error naming
the extra when the tokenizers package is missing."""
import os
import sys

import pytest

from leanformer.models import load_tokenizer, smollm2_path

transformers = pytest.importorskip("transformers", reason="the reference is transformers' tokenizer")
pytest.importorskip("tokenizers")

TEXTS = ["Hello world", " leading space", "naïve café — “quotes” 日本語 😀 emoji", "ÀÉÎÕÜ ß ø ﬁ",
         "def f(x):\n    return x**2  # comment\n\n\n", "tabs\tand   runs     of spaces\n\n  \n \t ",
         "<|im_start|>user\nhi<|im_end|>\n", "", "1234567 numbers 3.14159 -0.5e-3", "don't we'll I'M",
         "https://example.com/a?b=c&d=e", "\u200b\u00a0zero-width and nbsp"]
CHATS = [[{"role": "user", "content": "What is 2+2?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]


def smollm2():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def pair():
    path = smollm2()
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return load_tokenizer(path), ref


def check_equal(ours, ref):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids) == text
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)


def test_gguf_tokenizer_matches_transformers(pair):
    ours, ref = pair
    check_equal(ours, ref)
    assert len(ours) == 49152 and ours.eos_token_id == 2
    assert ours.encode("<|im_end|>") == [2]  # special tokens match whole
    assert ours.decode(ours.encode("a<|im_end|>"), skip_special_tokens=True) == "a"


def test_hf_folder_tokenizer_matches_transformers(pair, tmp_path):
    """The same tokenizer saved as a Hugging Face folder (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), read back by both."""
    pair[1].save_pretrained(tmp_path)
    ours, ref = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    check_equal(ours, ref)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("Hello world") == ours.encode("Hello world")


def write_tiny_gguf(path, add_bos):
    """A byte-level BPE over the 256 byte symbols, 3 merges and 3 control tokens."""
    gguf = pytest.importorskip("gguf")
    from leanformer.models.tokenizer import BYTE_SPELLING
    symbols = [BYTE_SPELLING[b] for b in range(256)]
    merges = ["h e", "l l", "he ll"]
    tokens = ["<s>", "</s>", "<unk>"] + symbols + ["he", "ll", "hell"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("add_bos", [False, True])
def test_tiny_gguf_tokenizer_and_its_bos_flag(tmp_path, add_bos):
    write_tiny_gguf(tmp_path / "t.gguf", add_bos)
    ours = load_tokenizer(tmp_path / "t.gguf")
    assert ours.encode("hello") == [0] * add_bos + [261, ours.backend.token_to_id("o")]
    assert ours.encode("hello", add_special_tokens=False) == [261, ours.backend.token_to_id("o")]
    assert ours.decode(ours.encode("hello é</s>")) == "<s>" * add_bos + "hello é</s>"
    assert (ours.bos_token_id, ours.eos_token_id, ours.chat_template) == (0, 1, None)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])


def test_missing_tokenizers_names_the_extra(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "t.gguf", False)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r'pip install "leanformer\[hf\]"'):
        load_tokenizer(tmp_path / "t.gguf")
