"""Simplified linear attention written the way a user would in eager PyTorch.

Each function computes in ``compute_dtype`` (default: the input's dtype, as a user's code
would) and returns the input dtype. States are ``(S [B, H, Dk, Dv], z [B, H, Dk])``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

State = Tuple[Tensor, Tensor]


def _features(q, k, v, compute_dtype):
    dt = compute_dtype or q.dtype
    return F.relu(q.to(dt)), F.relu(k.to(dt)), v.to(dt)


def sla_noncausal_reference(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, *,
                            compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Non-causal: S = sum_j phi(k_j)^T v_j, z = sum_j phi(k_j), o = phi(q) S / (phi(q) z + eps)."""
    qf, kf, vf = _features(q, k, v, compute_dtype)
    S = torch.einsum("bthd,bthe->bhde", kf, vf)
    z = kf.sum(1)
    num = torch.einsum("bthd,bhde->bthe", qf, S)
    den = torch.einsum("bthd,bhd->bth", qf, z) + eps
    return (num / den.unsqueeze(-1)).to(q.dtype)


def sla_causal_quadratic_reference(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, *,
                                   initial_state: Optional[State] = None,
                                   compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, State]:
    """Causal, as masked quadratic attention: O(T^2) memory. Returns (o, final state)."""
    qf, kf, vf = _features(q, k, v, compute_dtype)
    T = q.shape[1]
    A = torch.einsum("bthd,bshd->bhts", qf, kf)
    A = A.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0)
    num = torch.einsum("bhts,bshe->bthe", A, vf)
    den = A.sum(-1).transpose(1, 2) + eps
    S = torch.einsum("bthd,bthe->bhde", kf, vf)
    z = kf.sum(1)
    if initial_state is not None:
        S0, z0 = (s.to(qf.dtype) for s in initial_state)
        num = num + torch.einsum("bthd,bhde->bthe", qf, S0)
        den = den + torch.einsum("bthd,bhd->bth", qf, z0)
        S, z = S + S0, z + z0
    return (num / den.unsqueeze(-1)).to(q.dtype), (S, z)


def sla_causal_chunked_reference(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, *,
                                 chunk: int = 64, initial_state: Optional[State] = None,
                                 compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, State]:
    """Causal, chunked: intra-chunk masked attention plus the state before each chunk
    (an exclusive cumsum of per-chunk K^T V). Returns (o, final state)."""
    qf, kf, vf = _features(q, k, v, compute_dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        qf, kf, vf = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qf, kf, vf))
    N = (T + pad) // chunk
    # [B, H, N, C, D]
    qc, kc, vc = (x.view(B, N, chunk, H, -1).permute(0, 3, 1, 2, 4) for x in (qf, kf, vf))
    kv = kc.transpose(-1, -2) @ vc                      # [B, H, N, Dk, Dv]
    ksum = kc.sum(-2)                                   # [B, H, N, Dk]
    S_prev = kv.cumsum(2) - kv
    z_prev = ksum.cumsum(2) - ksum
    if initial_state is not None:
        S0, z0 = (s.to(qf.dtype) for s in initial_state)
        S_prev = S_prev + S0.unsqueeze(2)
        z_prev = z_prev + z0.unsqueeze(2)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    A = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0)
    num = A @ vc + qc @ S_prev
    den = A.sum(-1) + (qc @ z_prev.unsqueeze(-1)).squeeze(-1) + eps
    o = (num / den.unsqueeze(-1)).permute(0, 2, 3, 1, 4).reshape(B, N * chunk, H, Dv)[:, :T]
    S_final = S_prev[:, :, -1] + kv[:, :, -1] if N else _empty_state(q, Dv, qf.dtype, initial_state)[0]
    z_final = z_prev[:, :, -1] + ksum[:, :, -1] if N else _empty_state(q, Dv, qf.dtype, initial_state)[1]
    return o.to(q.dtype), (S_final, z_final)


def _empty_state(q, Dv, dtype, initial_state):
    if initial_state is not None:
        return tuple(s.to(dtype) for s in initial_state)
    B, _, H, Dk = q.shape
    return q.new_zeros(B, H, Dk, Dv, dtype=dtype), q.new_zeros(B, H, Dk, dtype=dtype)


def sla_step_reference(q: Tensor, k: Tensor, v: Tensor, state: State, eps: float = 1e-6) -> Tuple[Tensor, State]:
    """One decode step: q, k [B, H, Dk], v [B, H, Dv]; state (S, z) in fp32."""
    S, z = state
    qf, kf = F.relu(q.to(S.dtype)), F.relu(k.to(S.dtype))
    S = S + kf.unsqueeze(-1) * v.to(S.dtype).unsqueeze(-2)
    z = z + kf
    num = torch.einsum("bhd,bhde->bhe", qf, S)
    den = (qf * z).sum(-1, keepdim=True) + eps
    return (num / den).to(q.dtype), (S, z)
