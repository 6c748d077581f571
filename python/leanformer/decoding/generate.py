"""leanformer.generate: plain decoding, or tree-verified decoding with a drafter (draft -> token
tree -> one forward that verifies it (and, for Hidden Transfer, drafts the next tree) ->
verification op -> commit of the accepted path into the cache), for a batch of prompts of
different lengths.

It drives the decoding half of the layer-stack protocol (:class:`leanformer.models.CausalLM`):
``new_cache``, ``prefill``, a plain step ``model(tokens, cache=cache)``, the tree forward of the
drafter over the cache, and the cache's ``commit`` and ``select``.

A drafter has ``model`` (the model it drafts for), ``num_future`` (how many tokens it proposes
per step), ``tree_forward(cache, tree) -> (logits [B, T, V], features)`` (the verifying forward
of a :class:`TokenTree`) and ``draft(features, node [B]) -> [B, num_future, V]`` (the draft
logits after the accepted node). A drafter with ``drafts_from_tokens = True`` (a
:class:`~leanformer.decoding.LookupDrafter`) drafts from the tokens instead: ``start(prompts)``
gives a per-call state whose ``tree(rows, device)`` is each step's :class:`TokenTree` (rooted at
each sequence's last token) and ``extend(seq, tokens)`` takes the tokens each step accepted."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from leanformer.decoding.sampling import warp_probs
from leanformer.decoding.token_tree import DynamicTree, TokenTree, TreeShape
from leanformer.models import CausalLM
from leanformer.nn.packed_linear_layers import packed_linears
from leanformer.ops import verify_tree_greedy, verify_tree_sampling


@dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        sequences: the new tokens of each sequence (int64, up to ``max_new_tokens``, ending at
            the first ``eos_token_id`` if one came).
        forwards: decoding forwards of the model (the prefill not counted).
        tokens_per_forward: new tokens per forward and sequence, averaged over every
            (forward, running sequence) pair: 1 for plain decoding, the mean accepted length
            (bonus token included) for tree decoding.
    """

    sequences: List[Tensor]
    forwards: int = 0
    tokens_per_forward: float = 0.0
    accepted_lengths: List[int] = field(default_factory=list, repr=False)

    def padded(self, pad: int = -1) -> Tensor:
        """``[B, max length]`` with ``pad`` after each sequence's end."""
        out = torch.full((len(self.sequences), max(len(s) for s in self.sequences)), pad, dtype=torch.long)
        for b, s in enumerate(self.sequences):
            out[b, :len(s)] = s
        return out


def _prompts(input_ids: Union[Tensor, Sequence]) -> tuple:
    """``[B, P]`` or a list of 1-D prompts -> right-padded ``[B, P]`` and lengths ``[B]``."""
    if isinstance(input_ids, Tensor):
        if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be int64 [B, P] with P >= 1, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        return input_ids, torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
    seqs = [torch.as_tensor(p, dtype=torch.long).flatten() for p in input_ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("input_ids must be a non-empty list of non-empty prompts")
    lengths = torch.tensor([len(s) for s in seqs])
    padded = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for b, s in enumerate(seqs):
        padded[b, :len(s)] = s
    return padded, lengths


def generate(model, input_ids: Union[Tensor, Sequence], *, max_new_tokens: int, drafter=None,
             tree: Optional[Union[TreeShape, DynamicTree]] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, eos_token_id: Optional[int] = None,
             pack_linears: bool = True) -> Generation:
    """Decodes ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a :class:`~leanformer.models.LlamaLM` or :class:`~leanformer.models.SLABLM` (eval;
            any :class:`~leanformer.models.CausalLM`).
        input_ids: int64 ``[B, P]``, or a list of B prompts of different lengths.
        drafter: None for plain decoding; a :class:`~leanformer.decoding.MedusaHeads`,
            :class:`~leanformer.decoding.HiddenTransfer` or
            :class:`~leanformer.layers.ShallowExitDrafter` for tree-verified decoding; a
            :class:`~leanformer.decoding.LookupDrafter` drafts chains from the tokens so far.
        tree: the token tree per step: a static :class:`TreeShape` (``TokenTree.from_paths``)
            or a :class:`DynamicTree`; default a chain as deep as the drafter's horizon. A
            :class:`~leanformer.decoding.LookupDrafter` takes none (its chains are its tree).
        temperature: 0 is greedy; above 0 samples from the distribution warped by
            ``temperature``/``top_k``/``top_p`` (``leanformer.decoding.warp_probs``, the warp the
            sampling verification uses, so tree decoding samples exactly what plain does).
        generator: the random source of sampling.
        eos_token_id: a sequence stops after emitting it; the others go on.
        pack_linears: decode with the model's (and drafter's) float32 CPU ``nn.Linear`` layers
            on prepacked weights (:func:`leanformer.nn.packed_linears`), plain and tree
            decoding alike; False keeps ``F.linear``. The tokens are the same up to float
            summation order. The packed copies stay with the layers for later calls (the
            linear weights' memory once more; ``leanformer.nn.release_packed(model)`` frees
            them).

    Returns:
        a :class:`Generation` (tokens and statistics).

    Example::

        >>> out = leanformer.generate(model, [b"def ", b"The "], max_new_tokens=64, drafter=heads,
        ...                           tree=TokenTree.from_paths([[0], [1], [0, 0], [0, 0, 0]]))
        >>> out.sequences[0], out.tokens_per_forward
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"generate takes a LlamaLM or a SLABLM (a leanformer.models.CausalLM), got "
                        f"{type(model).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    greedy = temperature == 0
    if greedy and (top_k is not None or top_p is not None):
        raise ValueError("top_k/top_p apply to sampling: set temperature > 0")
    padded, lengths = _prompts(input_ids)
    vocab = model.config.vocab_size
    if int(padded.max()) >= vocab or int(padded.min()) < 0:
        raise ValueError(f"input_ids must be token ids in 0..{vocab - 1}")
    if getattr(drafter, "drafts_from_tokens", False):  # a LookupDrafter: chains from the tokens so far
        if tree is not None:
            raise ValueError(f"{type(drafter).__name__} drafts its own chains: pass no tree")
        if drafter.model is not model:
            raise ValueError("the drafter was built for another model")
    elif drafter is not None:
        if tree is None:
            tree = TokenTree.from_paths([[0] * d for d in range(1, drafter.num_future + 1)])
        depth = tree.depth if isinstance(tree, TreeShape) else drafter.num_future
        if depth > drafter.num_future:
            raise ValueError(f"the tree is {depth} deep but the drafter proposes {drafter.num_future} tokens")
        if drafter.model is not model:
            raise ValueError("the drafter was built for another model")
    elif tree is not None:
        raise ValueError("a tree needs a drafter (tree=... without drafter=...)")
    # inference mode, not just no_grad: our custom ops then skip their (Python) autograd
    # kernel, ~10 us a call at decoding sizes; the returned tensors are made after it ends
    linears = packed_linears(model, drafter, keep_packed=True) if pack_linears else contextlib.nullcontext()
    with torch.inference_mode(), linears:
        out, forwards, accepted_lengths = _decode(model, padded, lengths, max_new_tokens, drafter, tree, greedy,
                                                  temperature, top_k, top_p, generator, eos_token_id)
    return Generation([torch.tensor(s, dtype=torch.long) for s in out], forwards,
                      sum(accepted_lengths) / len(accepted_lengths), accepted_lengths)


def _decode(model, padded: Tensor, lengths: Tensor, max_new_tokens: int, drafter, tree, greedy: bool,
            temperature: float, top_k, top_p, generator, eos_token_id):
    device = next(model.parameters()).device
    B = padded.shape[0]
    lookup = drafter.start([padded[b, :int(lengths[b])].tolist() for b in range(B)]) \
        if getattr(drafter, "drafts_from_tokens", False) else None
    per_forward = 1 if drafter is None else 1 + drafter.num_future if lookup is not None \
        else tree.size * (1 + getattr(drafter, "num_future", 0))
    cache = model.new_cache(B, int(lengths.max()) + max_new_tokens + per_forward + 1)
    padded, lengths = padded.to(device), lengths.to(device)
    model.prefill(cache, padded[:, :-1], lengths - 1)  # the last prompt token is the first root
    root = padded[torch.arange(B, device=device), lengths - 1]

    out: List[List[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # cache row -> sequence index
    drafts, forwards, accepted_lengths = None, 0, []
    while rows:
        if drafter is None:
            logits = model(root[:, None], cache=cache)[:, 0]
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = warp_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            new = [[t] for t in nxt.tolist()]
        else:
            if lookup is not None:
                t_tree = lookup.tree(rows, device)
            else:
                t_tree = (TokenTree.from_nodes([[(-1, r)] for r in root.tolist()], device=device)
                          if drafts is None else tree.build(root, drafts))
            logits, features = drafter.tree_forward(cache, t_tree)
            if greedy:
                acc, n, nxt = verify_tree_greedy(logits, t_tree.tokens, t_tree.parents)
            else:
                probs = warp_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                acc, n, nxt = verify_tree_sampling(probs, t_tree.tokens, t_tree.parents, generator=generator)
            cache.commit(acc, n)
            if lookup is None:
                drafts = drafter.draft(features, acc.gather(1, (n - 1)[:, None]).squeeze(1))
            tokens, acc_l, n_l = t_tree.tokens.tolist(), acc.tolist(), n.tolist()
            new = [[tokens[r][i] for i in acc_l[r][1:n_l[r]]] + [b] for r, b in enumerate(nxt.tolist())]
        forwards += 1
        keep = []
        for r, toks in enumerate(new):
            seq = out[rows[r]]
            accepted_lengths.append(len(toks))
            for t in toks:
                seq.append(t)
                if t == eos_token_id or len(seq) == max_new_tokens:
                    break
            if lookup is not None:
                lookup.extend(rows[r], toks)
            if not (len(seq) == max_new_tokens or (eos_token_id is not None and seq[-1] == eos_token_id)):
                keep.append(r)
        if len(keep) < len(rows):
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select(sel)
            rows = [rows[r] for r in keep]
            nxt = nxt[sel]
            drafts = None if drafts is None else drafts[sel]
        root = nxt
    return out, forwards, accepted_lengths
