"""BERT's uncased WordPiece tokenizer in pure Python (no ``tokenizers`` at run time).

It follows the ``tokenizers`` implementation that sentence-transformers uses (BertNormalizer,
BertPreTokenizer, WordPiece, the [CLS] ... [SEP] template):

1. special tokens written literally in the text ("[MASK]", ...) are kept whole;
2. clean: drop NUL, U+FFFD and control characters, turn every whitespace into a space;
3. put spaces around CJK ideographs;
4. strip accents (NFD, then drop non-spacing marks) and lowercase, in that order;
5. split on whitespace and around every punctuation character (ASCII punctuation and the
   Unicode P* categories);
6. greedy longest-match WordPiece per word, continuations prefixed "##"; a word longer than
   100 characters, or one that cannot be covered by the vocabulary, becomes [UNK].
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def normalize(text: str, *, lowercase: bool = True, strip_accents: Optional[bool] = None) -> str:
    """Steps 2-4 above (BertNormalizer); ``strip_accents=None`` follows ``lowercase``."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = "".join(out)
    if lowercase if strip_accents is None else strip_accents:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = "".join(c.lower() for c in text)  # per character: no final-sigma rule, as in tokenizers
    return text


def pre_tokenize(text: str) -> List[str]:
    """Step 5 (BertPreTokenizer): whitespace-separated words, each punctuation mark its own word."""
    words: List[str] = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer:
    """The tokenizer of a BERT ``vocab.txt`` (one token a line, the id is the line number).

    Example::

        >>> tok = WordPieceTokenizer.from_file("vocab.txt", max_length=256)
        >>> batch = tok(["Hello world!", "Tokenizers are fun."])
        >>> batch["input_ids"].shape, batch["attention_mask"].shape   # padded to the longest
    """

    def __init__(self, vocab: Dict[str, int], *, max_length: int = 512, lowercase: bool = True,
                 strip_accents: Optional[bool] = None, max_input_chars_per_word: int = 100):
        for tok in SPECIAL_TOKENS:
            if tok not in vocab:
                raise ValueError(f"the vocabulary has no {tok} token")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.max_length = max_length
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self.max_input_chars_per_word = max_input_chars_per_word
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self._special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self._cache: Dict[str, List[str]] = {}

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "WordPieceTokenizer":
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        vocab: Dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        return cls(vocab, **kwargs)

    def __len__(self) -> int:
        return len(self.vocab)

    def wordpiece(self, word: str) -> List[str]:
        """Step 6 for one pre-tokenized word."""
        if word in self._cache:
            return self._cache[word]
        if len(word) > self.max_input_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                pieces = ["[UNK]"]
                break
            pieces.append(piece)
            start = end
        if len(self._cache) < 100_000:
            self._cache[word] = pieces
        return pieces

    def tokenize(self, text: str) -> List[str]:
        """The word pieces of ``text``, without [CLS]/[SEP] and without truncation."""
        out: List[str] = []
        for part in self._special.split(text):
            if part in SPECIAL_TOKENS:
                out.append(part)
            elif part:
                for word in pre_tokenize(normalize(part, lowercase=self.lowercase,
                                                   strip_accents=self.strip_accents)):
                    out.extend(self.wordpiece(word))
        return out

    def encode(self, text: str, max_length: Optional[int] = None) -> List[int]:
        """``[CLS] pieces [SEP]`` as ids, the pieces truncated so the whole fits ``max_length``
        (default: the tokenizer's)."""
        max_length = self.max_length if max_length is None else max_length
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)][:max_length - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        return [self.ids_to_tokens[int(i)] for i in ids]

    def __call__(self, texts: Sequence[str], max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """A batch: ``input_ids``, ``attention_mask`` (1 on real tokens) and ``token_type_ids``
        (zeros), int64 ``[B, T]`` with T the longest encoded text (padded on the right with [PAD])."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_length) for t in texts]
        T = max((len(e) for e in encoded), default=0)
        input_ids = torch.full((len(encoded), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
        for i, e in enumerate(encoded):
            input_ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
            attention_mask[i, :len(e)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}
