"""Drafting by lookup: no drafter network, no draft forward. The draft after the last token is
copied from where the sequence's own recent tokens occurred before (prompt lookup decoding,
Saxena 2023: a model asked to rewrite, summarize or answer about a passage repeats much of it),
and, where the sequence offers no such match, continued by an n-gram table of text the model
itself generated (a datastore of its own outputs, as REST, He et al. 2024, retrieves from one).
The chain of drafted tokens is verified by one forward of the model like any token tree, so
the output is exactly the model's own (greedy, or sampled with the EAGLE rule)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from leanformer.decoding.token_tree import TokenTree


class NgramTable:
    """The most frequent next token after each n-gram (n = 1..``max_ngram``) of a set of token
    sequences, e.g. the model's own greedy outputs on training prompts. :meth:`continue_chain`
    drafts from it with backoff: the longest n-gram ending the context that the table holds
    gives the next token, then again from the context extended by that token.

    Counting runs in int64 tensors: an n-gram and its next token are one number in base
    ``vocab_size``, so ``vocab_size ** (max_ngram + 1)`` must stay below 2**63 (SmolLM2's 49,152
    tokens allow ``max_ngram=3``; a 128k vocabulary, 2). Ties go to the smaller token id.

    Example::

        >>> table = NgramTable.from_sequences([[1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 5, 6]],
        ...                                   vocab_size=8, max_ngram=2)
        >>> table.continue_chain([9, 2, 3], 3)
        [5, 6]
    """

    def __init__(self, vocab_size: int, tables: List[Dict[int, int]]):
        self.vocab_size, self.tables = vocab_size, tables  # tables[n - 1]: n-gram code -> next token

    @property
    def max_ngram(self) -> int:
        return len(self.tables)

    @classmethod
    def from_sequences(cls, sequences: Sequence, *, vocab_size: int, max_ngram: int = 3) -> "NgramTable":
        """From token sequences (1-D int tensors or lists of ids in ``0..vocab_size - 1``)."""
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if vocab_size ** (max_ngram + 1) >= 2 ** 63:
            raise ValueError(f"vocab_size ** (max_ngram + 1) must be below 2**63: vocab_size={vocab_size} allows "
                             f"max_ngram up to {_largest_ngram(vocab_size)}, got max_ngram={max_ngram}")
        seqs = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
        for s in seqs:
            if len(s) and (int(s.min()) < 0 or int(s.max()) >= vocab_size):
                raise ValueError(f"sequences must hold token ids in 0..{vocab_size - 1}")
        tables = []
        for n in range(1, max_ngram + 1):
            codes = [_codes(s, n + 1, vocab_size) for s in seqs if len(s) > n]
            if not codes:
                tables.append({})
                continue
            code, count = torch.cat(codes).unique(return_counts=True)  # (n-gram, next) pairs, sorted
            gram, nxt = code // vocab_size, code % vocab_size
            # per n-gram the most frequent next token (the smallest id among equals): sort by
            # (gram, -count, next); unique sorted codes are already ordered by (gram, next)
            order = torch.sort(-count, stable=True).indices
            order = order[torch.sort(gram[order], stable=True).indices]
            gram, nxt = gram[order], nxt[order]
            first = torch.ones_like(gram, dtype=torch.bool)
            first[1:] = gram[1:] != gram[:-1]
            tables.append(dict(zip(gram[first].tolist(), nxt[first].tolist())))
        return cls(vocab_size, tables)

    def next_token(self, context: Sequence[int]) -> Optional[int]:
        """The table's next token after ``context`` (longest n-gram first), or None."""
        V, code = self.vocab_size, 0
        best = None
        for n in range(1, min(self.max_ngram, len(context)) + 1):
            code += context[-n] * V ** (n - 1)
            t = self.tables[n - 1].get(code)
            if t is None:  # no longer n-gram can be held either
                break
            best = t
        return best

    def continue_chain(self, context: Sequence[int], k: int) -> List[int]:
        """Up to ``k`` tokens after ``context``, each the table's next token after the context
        extended by the ones before it; shorter where the table has no n-gram to go on."""
        ctx = list(context[-self.max_ngram:]) if self.max_ngram else []
        out = []
        while len(out) < k:
            t = self.next_token(ctx)
            if t is None:
                break
            out.append(t)
            ctx = ctx[1:] + [t] if len(ctx) >= self.max_ngram else ctx + [t]
        return out


def _largest_ngram(vocab_size: int) -> int:
    """The largest max_ngram with ``vocab_size ** (max_ngram + 1) < 2**63`` (vocab_size >= 2)."""
    n = 0
    while vocab_size ** (n + 2) < 2 ** 63:
        n += 1
    return n


def _codes(s: Tensor, width: int, V: int) -> Tensor:
    """The base-V number of every window of ``width`` tokens of ``s`` (first token most
    significant)."""
    w = s.unfold(0, width, 1)
    code = torch.zeros(w.shape[0], dtype=torch.long)
    for j in range(width):
        code = code * V + w[:, j]
    return code


class LookupDrafter:
    #: the drafter protocol's other half (see :func:`leanformer.generate`): no draft network; a
    #: per-call state from :meth:`start` builds each step's tree from the tokens so far
    drafts_from_tokens = True

    """A drafter for :func:`leanformer.generate` with nothing to train: each step drafts a chain
    of up to ``num_future`` tokens after the last one, copied from the sequence's own context
    (prompt and output) where its last ``max_ngram``..``min_ngram`` tokens occurred before (the
    most recent occurrence of the longest match, copied on into the draft itself where it
    overlaps the end: a repeating loop drafts ``num_future`` tokens), else from ``datastore`` (an
    :class:`NgramTable`). The chain is verified in
    one tree forward of ``model``; the output is the model's own. A step with nothing to draft
    runs the root alone.

    Example::

        >>> drafter = LookupDrafter(model, num_future=4)
        >>> out = leanformer.generate(model, ids, max_new_tokens=64, drafter=drafter)
        >>> out.tokens_per_forward  # > 1 when the output repeats its prompt
    """

    def __init__(self, model, num_future: int = 4, *, max_ngram: int = 3, min_ngram: int = 1,
                 datastore: Optional[NgramTable] = None):
        if num_future < 1:
            raise ValueError(f"num_future must be >= 1, got {num_future}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if datastore is not None and datastore.vocab_size != model.config.vocab_size:
            raise ValueError(f"the datastore's vocab_size {datastore.vocab_size} is not the model's "
                             f"{model.config.vocab_size}")
        self.model, self.num_future = model, num_future
        self.max_ngram, self.min_ngram, self.datastore = max_ngram, min_ngram, datastore

    def start(self, prompts: List[List[int]]) -> "LookupState":
        """The per-sequence state of one :func:`generate` call (``prompts``: token ids)."""
        return LookupState(self, prompts)

    def tree_forward(self, cache, tree: TokenTree):
        """The verifying forward of the drafted chains: ``(logits [B, T, V], hidden [B, T, C])``."""
        return self.model.tree_logits(cache, tree.tokens.clamp(min=0), tree.mask, tree.depths, tree.parents)


class LookupState:
    """The context of each sequence and an index of where each of its n-grams last occurred
    (with at least one token after it), updated as tokens are accepted."""

    def __init__(self, drafter: LookupDrafter, prompts: List[List[int]]):
        self.drafter = drafter
        self.tokens: List[List[int]] = []
        self.index: List[Dict[tuple, int]] = []
        for p in prompts:
            self.tokens.append([])
            self.index.append({})
            self.extend(len(self.tokens) - 1, p)

    def extend(self, seq: int, new: Sequence[int]) -> None:
        """Appends ``new`` to sequence ``seq``'s context."""
        toks, index, lo, hi = self.tokens[seq], self.index[seq], self.drafter.min_ngram, self.drafter.max_ngram
        for t in new:
            toks.append(int(t))
            L = len(toks)  # the n-grams ending at L - 1 now have a token after them
            for n in range(lo, min(hi, L - 1) + 1):
                index[tuple(toks[L - 1 - n:L - 1])] = L - 1

    def draft(self, seq: int) -> List[int]:
        """The chain after sequence ``seq``'s last token (up to ``num_future`` tokens)."""
        d = self.drafter
        toks, index, k = self.tokens[seq], self.index[seq], d.num_future
        out: List[int] = []
        L = len(toks)
        for n in range(min(d.max_ngram, L), d.min_ngram - 1, -1):
            at = index.get(tuple(toks[L - n:]))
            if at is not None:
                # what followed, copied on past the end of the context into the draft itself (as
                # LZ77 copies an overlapping match): a loop of period p drafts k tokens, not p
                for i in range(k):
                    out.append(toks[at + i] if at + i < L else out[at + i - L])
                break
        if len(out) < k and d.datastore is not None:  # the table reads the last max_ngram tokens only
            out = out + d.datastore.continue_chain(toks[-d.datastore.max_ngram:] + out, k - len(out))
        return out

    def tree(self, seqs: List[int], device=None) -> TokenTree:
        """The chains of sequences ``seqs`` (one per cache row) as a :class:`TokenTree`: the
        root is each sequence's last token."""
        nodes = []
        for s in seqs:
            chain = [self.tokens[s][-1]] + self.draft(s)
            nodes.append([(i - 1, t) for i, t in enumerate(chain)])
        return TokenTree.from_nodes(nodes, device=device)
