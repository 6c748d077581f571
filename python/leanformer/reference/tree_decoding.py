"""Tree-verified decoding written plainly in PyTorch: the math the tree ops must match.

Attention over [prefix + tree] with an explicit additive mask, masked quadratic linear
attention plus the prefix state, the two verifications as Python walks down the tree, and
KV-cache compaction by gather, the SLAB state update token by token. Shapes follow leanformer.ops.tree_decoding.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ancestor_mask(parents: Tensor) -> Tensor:
    """bool ``[..., T, T]`` from ``parents [..., T]``: ``[i, j]`` true iff j is i or an ancestor of i."""
    T = parents.shape[-1]
    mask = torch.eye(T, dtype=torch.bool, device=parents.device).expand(*parents.shape, T).clone()
    for i in range(1, T):
        p = parents[..., i].clamp_min(0)
        mask[..., i, :] |= mask[..., :, :].gather(-2, p[..., None, None].expand(*p.shape, 1, T)).squeeze(-2)
    return mask


def batched_tree_mask(tree_mask: Tensor, batch: int) -> Tensor:
    """``[T, T]`` or ``[B, T, T]`` -> ``[B, T, T]``."""
    return tree_mask.expand(batch, *tree_mask.shape[-2:]) if tree_mask.dim() == 2 else tree_mask


def prefix_tree_additive_mask(cache_lens: Tensor, tree_mask: Tensor, prefix_len: int,
                              dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense additive mask ``[B, 1, T, prefix_len + T]`` over ``[cache[:prefix_len] + tree]``:
    0 where a tree query may look (cache slots below cache_lens[b], its ancestors and itself),
    -inf elsewhere. What a dense attention needs and the tree ops never build."""
    B = cache_lens.shape[0]
    tm = batched_tree_mask(tree_mask, B)
    T = tm.shape[-1]
    prefix_ok = torch.arange(prefix_len, device=cache_lens.device) < cache_lens[:, None]
    allowed = torch.cat([prefix_ok[:, None, :].expand(B, T, prefix_len), tm], dim=-1)
    zero = torch.zeros((), dtype=dtype, device=tm.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=tm.device))[:, None]


def tree_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                             k_tree: Tensor, v_tree: Tensor, tree_mask: Tensor,
                             scale: Optional[float] = None) -> Tensor:
    """Softmax attention of q ``[B, T, Hq, D]`` over the whole cache plus the tree with an
    explicit additive mask (slots beyond cache_lens[b] and non-ancestors at -inf), GQA by
    repeating the KV heads; fp32 math (fp64 for fp64). Returns ``o [B, T, Hq, Dv]``."""
    cd = _compute_dtype(q.dtype)
    B, T, Hq, D = q.shape
    Hkv, L = k_cache.shape[2], k_cache.shape[1]
    keys = torch.cat([k_cache, k_tree], dim=1).to(cd).repeat_interleave(Hq // Hkv, dim=2)
    values = torch.cat([v_cache, v_tree], dim=1).to(cd).repeat_interleave(Hq // Hkv, dim=2)
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q.to(cd), keys) * scale
    scores = scores + prefix_tree_additive_mask(cache_lens, tree_mask, L, cd)
    o = torch.einsum("bhts,bshe->bthe", scores.softmax(-1), values)
    return o.to(q.dtype)


def tree_linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor,
                                    tree_mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``o_i = phi(q_i) (S + sum_j m_ij phi(k_j)^T v_j) / (phi(q_i) . (z + sum_j m_ij phi(k_j)) + eps)``
    with phi = ReLU and m the ancestor mask: masked quadratic attention plus the prefix state."""
    cd = _compute_dtype(q.dtype)
    qf, kf, vf = F.relu(q.to(cd)), F.relu(k.to(cd)), v.to(cd)
    m = batched_tree_mask(tree_mask, q.shape[0]).to(cd)
    A = torch.einsum("bthd,bshd->bhts", qf, kf) * m[:, None]
    num = torch.einsum("bhts,bshe->bthe", A, vf) + torch.einsum("bthd,bhde->bthe", qf, S.to(cd))
    den = A.sum(-1).transpose(1, 2) + torch.einsum("bthd,bhd->bth", qf, z.to(cd)) + eps
    return (num / den[..., None]).to(q.dtype)


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
    logits; stop when there is none and emit that argmax as the bonus."""
    B, T, _ = logits.shape
    paths, bonus = [], []
    for b in range(B):
        tokens = tree_tokens[b].tolist()
        kids = _children(_parents_row(parents, b), tokens)
        node, path = 0, [0]
        while True:
            best = int(logits[b, node].float().argmax())
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


def sla_tree_commit_reference(S: List[Tensor], z: List[Tensor], conv_tail: List[Tensor], k: List[Tensor],
                              v: List[Tensor], path: Tensor, num_accepted: Tensor):
    """Out of place: each layer's ``(S, z, conv_tail)`` after plain decoding of the path's tokens,
    one token at a time (``S += relu(k)^T v``, ``z += relu(k)``, the conv tail shifted by one V)."""
    S, z = [s.clone() for s in S], [x.clone() for x in z]
    tails = [t.clone() for t in conv_tail]
    B, H = S[0].shape[:2]
    for l in range(len(S)):
        for b in range(B):
            for j in range(int(num_accepted[b])):
                i = int(path[b, j])
                kf = torch.relu(k[l][b, i].to(S[l].dtype))  # [H, Dk]
                S[l][b] += kf[:, :, None] * v[l][b, i].to(S[l].dtype)[:, None, :]
                z[l][b] += kf
                if tails and tails[l].shape[-1]:
                    rows = tails[l][b * H:(b + 1) * H]  # [H, Dv, W], oldest first
                    rows.copy_(torch.cat([rows[..., 1:], v[l][b, i].to(rows.dtype)[..., None]], -1))
    return S, z, tails


def tree_dwconv_reference(v: Tensor, conv_tail: Tensor, parents: Tensor, weight: Tensor,
                          bias: Optional[Tensor] = None) -> Tensor:
    """SLAB's causal depthwise conv of V per tree node ``v [B, T, H, D]``, over the node's
    ancestor chain continued into ``conv_tail [B*H, D, W]`` (oldest first): a lag table (node l
    steps up, or ``-1 - r`` for the r-th tail value back), a gather from ``tail ++ v``, and the
    taps ``weight [D, W + 1]`` (lag l uses tap W - l) plus ``bias [D]``; fp32 math (fp64 for fp64)."""
    cd = _compute_dtype(v.dtype)
    B, T, H, D = v.shape
    K = weight.shape[1]
    W = K - 1
    par = parents.expand(B, T) if parents.dim() == 1 else parents
    cur = torch.arange(T, device=v.device).expand(B, T)
    lags = []
    for _ in range(K):
        lags.append(cur)
        cur = torch.where(cur >= 0, par.gather(1, cur.clamp(min=0)), cur - 1)
    pool_idx = torch.stack(lags, -1) + W  # into cat([tail, v]): node n -> W + n, tail value r back -> W - 1 - r
    pool = torch.cat([conv_tail.reshape(B, H, D, W).permute(0, 3, 1, 2), v], dim=1).to(cd)  # [B, W + T, H, D]
    gathered = pool[torch.arange(B, device=v.device)[:, None, None], pool_idx]  # [B, T, K, H, D]
    out = (gathered * weight.to(cd).flip(-1).t()[None, None, :, None, :]).sum(2)
    return (out + bias.to(cd) if bias is not None else out).to(v.dtype)
