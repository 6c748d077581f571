"""The tree_verify family written plainly in PyTorch: the two verifications as Python walks
down the tree, and KV-cache compaction by gather. Shapes as in :mod:`leanformer.ops.tree_verify`."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def _children(parents: List[int], tokens: List[int]) -> List[List[int]]:
    """Children of every node in index order, skipping -1 padding."""
    kids: List[List[int]] = [[] for _ in parents]
    for i in range(1, len(parents)):
        if tokens[i] != -1:
            kids[parents[i]].append(i)
    return kids


def _parents_row(parents: Tensor, b: int) -> List[int]:
    return (parents[b] if parents.dim() == 2 else parents).tolist()


def _verification(paths: List[List[int]], bonus: List[int], T: int,
                  device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """(accepted [B, T] padded with -1, num_accepted [B], bonus [B]) from per-sequence paths."""
    accepted = torch.full((len(paths), T), -1, dtype=torch.long)
    for b, p in enumerate(paths):
        accepted[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    return (accepted.to(device), torch.tensor([len(p) for p in paths], dtype=torch.long, device=device),
            torch.tensor(bonus, dtype=torch.long, device=device))


def verify_tree_greedy_reference(logits: Tensor, tree_tokens: Tensor,
                                 parents: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """From the root, move to the first child whose token is the argmax of the current node's
    logits (torch.argmax in the logits' own dtype: ties to the lowest id, NaN the maximum); stop
    when there is none and emit that argmax as the bonus."""
    B, T, _ = logits.shape
    paths, bonus = [], []
    for b in range(B):
        tokens = tree_tokens[b].tolist()
        kids = _children(_parents_row(parents, b), tokens)
        node, path = 0, [0]
        while True:
            best = int(logits[b, node].argmax())
            nxt = next((c for c in kids[node] if tokens[c] == best), None)
            if nxt is None:
                bonus.append(best)
                break
            node = nxt
            path.append(node)
        paths.append(path)
    return _verification(paths, bonus, T, logits.device)


def verify_tree_sampling_reference(probs: Tensor, tree_tokens: Tensor, parents: Tensor,
                                   uniforms: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The lossless rule for deterministic drafts (EAGLE): at the current node with target p,
    try its children in order (a token already tried at this node is skipped), accepting child
    x if u * mass < p(x) where mass is p's total minus the rejected tokens' p; on rejection
    p(x) = 0. With every child rejected, the bonus is drawn from the residual p by inverse CDF.
    Uniforms are consumed in order, one per child tried and one for the bonus."""
    B, T, V = probs.shape
    paths, bonus = [], []
    for b in range(B):
        tokens = tree_tokens[b].tolist()
        kids = _children(_parents_row(parents, b), tokens)
        u = uniforms[b].double().tolist()
        used = 0
        node, path = 0, [0]
        while True:
            p = probs[b, node].double().clone()
            mass = float(p.sum())
            tried, nxt = set(), None
            for c in kids[node]:
                x = tokens[c]
                if x in tried:
                    continue
                tried.add(x)
                if u[used] * mass < float(p[x]):
                    nxt = c
                    used += 1
                    break
                used += 1
                mass -= float(p[x])
                p[x] = 0.0
            if nxt is None:
                bonus.append(_inverse_cdf(p, u[used] * mass))
                break
            node = nxt
            path.append(node)
        paths.append(path)
    return _verification(paths, bonus, T, probs.device)


def _inverse_cdf(p: Tensor, target: float) -> int:
    """The first token whose cumulative p exceeds target; rounding past the end picks the last
    token with p > 0, and an all-zero residual the first token."""
    cum = 0.0
    last = 0
    for x, px in enumerate(p.tolist()):
        if px > 0:
            cum += px
            last = x
            if target < cum:
                return x
    return last


def compact_kv_cache_reference(k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                               accepted: Tensor, num_accepted: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Out of place: the cache with slot L + accepted[b, j] gathered to L + j (j < num_accepted[b])
    and the new lengths. Slots from the new length on keep whatever they held."""
    k, v = k_cache.clone(), v_cache.clone()
    for b in range(k.shape[0]):
        L, n = int(cache_lens[b]), int(num_accepted[b])
        src = L + accepted[b, :n].to(k.device)
        k[b, L:L + n] = k_cache[b].index_select(0, src)
        v[b, L:L + n] = v_cache[b].index_select(0, src)
    return k, v, cache_lens + num_accepted.to(cache_lens.device)
