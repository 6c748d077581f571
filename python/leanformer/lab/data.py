"""Real data that ships with the machine (no downloads): scikit-learn's handwritten digits, and
Python's own pydoc topics as byte-level text or as English sentences."""
from __future__ import annotations

import random
import re
from typing import List, Optional, Tuple

import torch
from pydoc_data.topics import topics
from torch import Tensor


def digits(test_fraction: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 real 8x8 handwritten digit scans as ``(x_train, y_train, x_test,
    y_test)``, x ``[N, 1, 8, 8]`` scaled to zero mean and unit variance (train statistics),
    y int64 in 0..9; a stratified held-out split fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every class held out
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    mean, std = x[~test].mean(), x[~test].std()
    x = (x - mean) / std
    return x[~test], y[~test], x[test], y[test]


def pydoc_text(val_fraction: float = 0.1) -> Tuple[Tensor, Tensor]:
    """Python's ``pydoc_data.topics`` (~465 KB of English technical text) as UTF-8 bytes,
    ``(train, val)`` int64 token tensors; the last ``val_fraction`` of the topics (in sorted
    order) is held out, so no topic straddles the split."""
    names = sorted(topics)
    n_val = max(1, round(len(names) * val_fraction))
    enc = lambda keys: torch.tensor(list("\n\n".join(topics[k] for k in keys).encode("utf-8")), dtype=torch.long)
    return enc(names[:-n_val]), enc(names[-n_val:])


def pydoc_sentences(n: Optional[int] = None, seed: int = 0, *, min_words: int = 4,
                    max_words: int = 80) -> List[str]:
    """Real English sentences from Python's ``pydoc_data.topics``: the prose paragraphs of every
    topic (code blocks, grammar rules and headings left out) split into sentences of
    ``min_words`` to ``max_words`` words, without duplicates. ``n`` of them drawn at random
    with ``seed`` (all of them, in sorted order, when ``n`` is None). The text is that of the
    running Python, so the sentences differ between Python versions."""
    found = set()
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if not para.strip() or lines[0].startswith((" ", "\t")) or any(
                    set(line.strip()) <= set("*=-~^") for line in lines):
                continue  # a code block, a grammar rule or a heading
            prose = " ".join(line.strip() for line in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", prose):
                if min_words <= len(s.split()) <= max_words:
                    found.add(s)
    sentences = sorted(found)
    if n is None:
        return sentences
    if n > len(sentences):
        raise ValueError(f"asked for {n} sentences, pydoc_data.topics has {len(sentences)}")
    return random.Random(seed).sample(sentences, n)


# Instruction templates around a sentence of the docs: the chat prompts of the real-model
# experiments (SmolLM2's drafters train on the training topics' prompts, are measured on the rest).
INSTRUCTIONS = ("Explain this in simple words: {s}", "Summarize in one sentence: {s}",
                "Give a short Python example that illustrates this: {s}", "Is this statement correct? {s}",
                "Rewrite this for a beginner: {s}", "What does the following mean? {s}",
                "Write one question a student might ask about this: {s}", "List the key terms in: {s}")


def _topic_split(split: str, val_fraction: float = 0.1) -> List[str]:
    names = sorted(topics)
    n_val = max(1, round(len(names) * val_fraction))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return names[:-n_val] if split == "train" else names[-n_val:]


def pydoc_prompts(split: str, n: int, *, seed: int = 0, text_fraction: float = 0.25) -> List[dict]:
    """``n`` real prompts from Python's pydoc topics, those of ``split``: ``"train"`` (the first
    90% of the topics in sorted order, as :func:`pydoc_text`) or ``"test"`` (the rest, held out).
    Each is ``{"kind": "chat", "text": instruction}`` (one of :data:`INSTRUCTIONS` around a prose
    sentence of a topic, for a chat template) or, for ``text_fraction`` of them, ``{"kind":
    "text", "text": passage}`` (the first 20-60 words of a prose paragraph, to be continued as
    plain text). Drawn at random with ``seed``, without repeats."""
    rng = random.Random(seed)
    sentences, passages = [], []
    for name in _topic_split(split):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.split("\n")
            if not para.strip() or lines[0].startswith((" ", "\t")) or any(
                    set(line.strip()) <= set("*=-~^") for line in lines):
                continue
            words = " ".join(line.strip() for line in lines).split()
            if len(words) >= 20:
                passages.append(" ".join(words[:rng.randint(20, 60)]))
            sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", " ".join(words))
                          if 6 <= len(s.split()) <= 40]
    n_text = round(n * text_fraction)
    if n - n_text > len(sentences) or n_text > len(passages):
        raise ValueError(f"asked for {n} prompts; the {split} topics hold {len(sentences)} sentences "
                         f"and {len(passages)} passages")
    chat = [{"kind": "chat", "text": rng.choice(INSTRUCTIONS).format(s=s)}
            for s in rng.sample(sorted(set(sentences)), n - n_text)]
    text = [{"kind": "text", "text": p} for p in rng.sample(sorted(set(passages)), n_text)]
    out = chat + text
    rng.shuffle(out)
    return out


def prompt_ids(tokenizer, prompt: dict) -> List[int]:
    """A :func:`pydoc_prompts` prompt as token ids: the chat template (with the generation prompt)
    for ``"chat"``, the plain text for ``"text"``."""
    if prompt["kind"] == "chat" and tokenizer.chat_template is not None:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt["text"]}]),
                                add_special_tokens=False)
    return tokenizer.encode(prompt["text"])
