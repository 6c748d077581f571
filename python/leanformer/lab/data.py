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
