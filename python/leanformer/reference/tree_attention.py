"""The tree_attention family written plainly in PyTorch: attention over [prefix + tree] with an
explicit additive mask, and masked quadratic linear attention plus the prefix state. Shapes as
in :mod:`leanformer.ops.tree_attention`."""
from __future__ import annotations

from typing import Optional

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
