"""The tree_state family written plainly in PyTorch: the SLAB state update token by token, and
the causal depthwise conv of V along each node's branch by a lag table. Shapes as in
:mod:`leanformer.ops.tree_state`."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


from leanformer.reference.tree_attention import _compute_dtype


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
