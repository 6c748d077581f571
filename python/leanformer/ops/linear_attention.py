"""Simplified linear attention (SLAB, Guo et al. ICML 2024): ReLU linear attention.

The kernels are torch.ops.leanformer.sla_forward / sla_backward / sla_step (C++ on CPU,
CUDA on GPU; their fake kernels for torch.compile and export are the C++ Meta kernels of
csrc/linear_attention_meta.cpp, which run the same argument checks). This file gives them
typed wrappers and autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

State = Tuple[Tensor, Tensor]

_ops = torch.ops.leanformer


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_state(state: Optional[State], name: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"{name} must be a pair (S [B, H, Dk, Dv], z [B, H, Dk]), got {type(state)}")
    return state[0], state[1]


def simplified_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, State]]:
    """ReLU linear attention: ``o_t = relu(q_t) S / (relu(q_t) . z + eps)``.

    ``S = sum_j relu(k_j)^T v_j`` and ``z = sum_j relu(k_j)`` run over every token
    (``causal=False``) or over ``j <= t`` (``causal=True``, computed chunk by chunk, no
    O(T * Dk * Dv) memory). No 1/sqrt(d) scale: it cancels between numerator and denominator.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``. float32, float16, bfloat16 (float64 on
            CPU); any strides. States and normalizers accumulate in fp32 whatever the dtype.
            Any head dims on CPU; Dk <= 256 on CUDA.
        causal: attend to tokens ``j <= t`` only.
        eps: added to the denominator.
        initial_state: ``(S [B, H, Dk, Dv], z [B, H, Dk])`` in fp32 (fp64 for fp64 inputs) to
            continue from a previous chunk; causal only.
        output_final_state: also return the state after the last token.

    Returns:
        ``o [B, T, H, Dv]`` in the input dtype, and with ``output_final_state=True`` the pair
        ``(o, (S, z))``.

    Example::

        >>> q, k, v = (torch.randn(2, 100, 4, 32) for _ in range(3))
        >>> o, state = simplified_linear_attention(q[:, :60], k[:, :60], v[:, :60], causal=True,
        ...                                        output_final_state=True)
        >>> o2 = simplified_linear_attention(q[:, 60:], k[:, 60:], v[:, 60:], causal=True,
        ...                                  initial_state=state)
        >>> torch.allclose(torch.cat([o, o2], 1),
        ...                simplified_linear_attention(q, k, v, causal=True), atol=1e-5)
        True
    """
    S0, z0 = _split_state(initial_state, "initial_state")
    o, S, z = _ops.sla_forward(q, k, v, S0, z0, causal, eps)
    if output_final_state:
        return o, (S, z)
    return o


def simplified_linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, state: Optional[State], *, eps: float = 1e-6
) -> Tuple[Tensor, State]:
    """One recurrent decode step of causal simplified linear attention.

    Args:
        q, k: ``[B, H, Dk]``; v: ``[B, H, Dv]``, the new token.
        state: ``(S [B, H, Dk, Dv], z [B, H, Dk])`` (fp32; fp64 for fp64 inputs), e.g. the
            final state of a causal prefill; ``None`` starts from an empty state.

    Returns:
        ``(o [B, H, Dv], (S_new, z_new))``. The input state is not modified.

    Example::

        >>> q, k, v = (torch.randn(1, 9, 4, 32) for _ in range(3))
        >>> _, state = simplified_linear_attention(q[:, :8], k[:, :8], v[:, :8], causal=True,
        ...                                        output_final_state=True)
        >>> o, state = simplified_linear_attention_step(q[:, 8], k[:, 8], v[:, 8], state)
    """
    if state is None:
        if q.dim() != 3 or v.dim() != 3:
            raise ValueError(f"q and v must be [B, H, D] for a decode step, got {tuple(q.shape)}"
                             f" and {tuple(v.shape)}")
        B, H, Dk = q.shape
        dtype = _state_dtype(q.dtype)
        state = (q.new_zeros(B, H, Dk, v.shape[-1], dtype=dtype), q.new_zeros(B, H, Dk, dtype=dtype))
    S, z = _split_state(state, "state")
    o, S_new, z_new = _ops.sla_step(q, k, v, S, z, eps)
    return o, (S_new, z_new)


# ---- autograd: each backward is itself a custom op ----

def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _sla_forward_setup(ctx, inputs, output):
    q, k, v, initial_S, initial_z, causal, eps = inputs
    ctx.causal, ctx.eps = causal, eps
    ctx.has_state = initial_S is not None
    ctx.save_for_backward(q, k, v, output[0], initial_S, initial_z)


def _sla_forward_backward(ctx, grad_o, grad_S, grad_z):
    q, k, v, o, initial_S, initial_z = ctx.saved_tensors
    dq, dk, dv, dS0, dz0 = _ops.sla_backward(
        _zeros_if_none(grad_o, o), grad_S, grad_z, q, k, v, o, initial_S, initial_z,
        ctx.causal, ctx.eps)
    if not ctx.has_state:
        dS0 = dz0 = None
    return dq, dk, dv, dS0, dz0, None, None


torch.library.register_autograd(
    "leanformer::sla_forward", _sla_forward_backward, setup_context=_sla_forward_setup)


def _sla_step_setup(ctx, inputs, output):
    q, k, v, S, z, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(q, k, v, output[0], S, z)


def _sla_step_backward(ctx, grad_o, grad_S, grad_z):
    # A decode step is the causal op on one token starting from (S, z).
    q, k, v, o, S, z = ctx.saved_tensors
    dq, dk, dv, dS, dz = _ops.sla_backward(
        _zeros_if_none(grad_o, o).unsqueeze(1), grad_S, grad_z, q.unsqueeze(1), k.unsqueeze(1),
        v.unsqueeze(1), o.unsqueeze(1), S, z, True, ctx.eps)
    return dq.squeeze(1), dk.squeeze(1), dv.squeeze(1), dS, dz, None


torch.library.register_autograd("leanformer::sla_step", _sla_step_backward, setup_context=_sla_step_setup)
