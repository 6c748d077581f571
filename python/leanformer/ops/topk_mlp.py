"""Top-k sparse MLP activation (Lazy Neuron Phenomenon, Li et al. ICLR 2023).

``MLP(x) = W_down TopK_k(act(W_up x + b_up)) + b_down``: per token only the k largest
activations are kept, so the down projection reads only k rows of ``W_down^T``.

``predicted_sparse_mlp`` computes the MLP on given (predicted) neurons only, so the up
projection is sparse too (Deja Vu). The kernels are torch.ops.leanformer.topk_activation /
sparse_down_projection / topk_mlp / predicted_sparse_mlp and
their backward ops (C++ on CPU, CUDA on GPU; their fake kernels for torch.compile and export
are the C++ Meta kernels of csrc/topk_mlp_meta.cpp, which run the same argument checks, all
but the indices' values). This file gives them typed wrappers and autograd.

Conventions shared by the three ops:

* Selection: the k largest activation values of each row, ranked as they are returned
  (rounded to the input dtype); ties go to the lowest index, NaN ranks above everything
  (as in ``torch.topk``). ``indices`` are int64 (what ``gather``/``index_select``/``scatter``
  take without a cast; the k indices of a row are a negligible share of the traffic) and
  sorted ascending, so the gathered rows of ``w_down_t`` are read in address order and the
  result does not depend on how ties among the values were ordered.
* ``w_down_t`` is the down projection's ``nn.Linear`` weight transposed, ``[d_ff, d_model]``
  and contiguous, so each selected neuron's row is one contiguous read.
* Sums accumulate in fp32 (fp64 for fp64 inputs); outputs are in the input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.leanformer

ACTIVATIONS = ("relu", "gelu")


def topk_activation(h: Tensor, k: int, *, activation: str = "relu") -> Tuple[Tensor, Tensor]:
    """The k largest ``act(h)`` of every row of ``h``, and their column indices.

    Args:
        h: ``[..., d_ff]`` pre-activations, float32/bfloat16 (float16 on CUDA, float64 for
            gradcheck).
        k: ``0 <= k <= d_ff``.
        activation: ``"relu"`` or ``"gelu"`` (exact, erf form), applied before the selection.

    Returns:
        ``(values [..., k], indices [..., k])``: ``values = act(h)`` at ``indices`` in h's
        dtype; indices int64, ascending within a row; ties go to the lowest index.
        Differentiable in ``h``: the gradient is ``grad_values * act'(h)`` at the selected
        entries and zero elsewhere.

    Example::

        >>> h = torch.tensor([[0.5, -1.0, 2.0, 0.5]])
        >>> topk_activation(h, 2)
        (tensor([[0.5000, 2.0000]]), tensor([[0, 2]]))
    """
    return _ops.topk_activation(h, k, activation)


def sparse_down_projection(values: Tensor, indices: Tensor, w_down_t: Tensor,
                           bias: Optional[Tensor] = None) -> Tensor:
    """``y = bias + sum_j values[..., j] * w_down_t[indices[..., j]]``, reading only those rows.

    The same as ``F.linear(h_sparse, w_down_t.T, bias)`` for the dense ``h_sparse`` that is
    ``values`` at ``indices`` and zero elsewhere, at the cost of k rows instead of d_ff.

    Args:
        values: ``[..., k]``, float32/bfloat16 (float16 on CUDA, float64 for gradcheck).
        indices: ``[..., k]`` int64 in ``[0, d_ff)``, e.g. from :func:`topk_activation`.
            Repeated indices add up.
        w_down_t: ``[d_ff, d_model]``, values' dtype; contiguous for speed (a strided one is
            copied on every call).
        bias: ``[d_model]`` or None.

    Returns:
        ``y [..., d_model]`` in values' dtype. Differentiable in values (the dot product of
        grad_y with each gathered row), w_down_t (a scatter-add into the selected rows) and
        bias; not in indices.

    Example::

        >>> h = torch.randn(4, 4096)
        >>> w_down = torch.randn(1024, 4096)  # nn.Linear(4096, 1024).weight
        >>> values, indices = topk_activation(h, 128)
        >>> y = sparse_down_projection(values, indices, w_down.t().contiguous())
    """
    return _ops.sparse_down_projection(values, indices, w_down_t, bias)


def topk_mlp(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down_t: Tensor,
             b_down: Optional[Tensor], k: int, *, activation: str = "relu",
             return_indices: bool = False):
    """The whole top-k MLP in one op: dense up projection, top-k of the activations, sparse
    down projection.

    ``y = sparse_down_projection(*topk_activation(x @ w_up.T + b_up, k), w_down_t, b_down)``.
    The up projection is a dense GEMM, so with top-k alone this beats the dense MLP by less
    than 2x; the saving is the down projection.

    Args:
        x: ``[..., d_model]``, float32/bfloat16 (float16 on CUDA, float64 for gradcheck).
        w_up: ``[d_ff, d_model]`` (``nn.Linear(d_model, d_ff).weight``); b_up ``[d_ff]`` or None.
        w_down_t: ``[d_ff, d_model]`` (``nn.Linear(d_ff, d_model).weight.T``, contiguous);
            b_down ``[d_model]`` or None.
        k: neurons kept per token, ``0 <= k <= d_ff``.
        activation: ``"relu"`` or ``"gelu"``.
        return_indices: also return the selected neurons ``[..., k]`` (int64, ascending).

    Returns:
        ``y [..., d_model]`` in x's dtype (and the indices). Differentiable in x, w_up, b_up,
        w_down_t and b_down; gradients flow through the selected neurons only (the gradient
        of the activations is zero outside the top-k set), so a top-k MLP can be trained.

    Example::

        >>> mlp = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4096, 1024))
        >>> x = torch.randn(1, 1024)
        >>> y = topk_mlp(x, mlp[0].weight, mlp[0].bias, mlp[2].weight.t().contiguous(),
        ...              mlp[2].bias, 123)
    """
    y, indices, _ = _ops.topk_mlp(x, w_up, b_up, w_down_t, b_down, k, activation)
    return (y, indices) if return_indices else y


def predicted_sparse_mlp(x: Tensor, w_up: Tensor, b_up: Optional[Tensor], w_down_t: Tensor,
                         b_down: Optional[Tensor], indices: Tensor, *, activation: str = "relu") -> Tensor:
    """The MLP computed on given neurons only (Deja Vu): k rows of ``w_up`` and of ``w_down_t``.

    ``y = b_down + sum_j act(x . w_up[idx_j] + b_up[idx_j]) * w_down_t[idx_j]`` with
    ``idx = indices[...]`` of x's row. With the neurons predicted in advance (e.g. the top-k
    scores of a :class:`leanformer.nn.NeuronPredictor`) neither projection is dense, so this
    can beat the dense MLP by more than the 2x a top-k MLP is limited to. Where the prediction
    misses an active neuron, its contribution is lost; with ``indices`` the true top-k set it
    equals :func:`topk_mlp`.

    Args:
        x: ``[..., d_model]``, float32/bfloat16 (float16 on CUDA, float64 for gradcheck).
        w_up: ``[d_ff, d_model]`` (``nn.Linear(d_model, d_ff).weight``); b_up ``[d_ff]`` or None.
        w_down_t: ``[d_ff, d_model]`` (``nn.Linear(d_ff, d_model).weight.T``, contiguous);
            b_down ``[d_model]`` or None.
        indices: ``[..., k]`` int64 in ``[0, d_ff)`` with x's leading dims, ``k <= d_ff``: the
            neurons of each row, in any order (a repeated index counts twice).
        activation: ``"relu"`` or ``"gelu"``.

    Returns:
        ``y [..., d_model]`` in x's dtype. Differentiable in x, w_up, b_up, w_down_t and b_down
        (the backward is the top-k MLP's, through the given neurons only); not in indices.
        The kernels target inference: on the CPU the k neurons of a row are split over the
        threads for fewer than 8 rows, on CUDA it is two gather GEMVs.

    Example::

        >>> mlp = PredictedSparseMLP(1024, 4096, k=123, rank=128)  # leanformer.nn
        >>> x = torch.randn(1, 1024)
        >>> idx = mlp.predictor(x).topk(123, dim=-1).indices
        >>> y = predicted_sparse_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.w_down_t(), mlp.fc2.bias, idx)
    """
    return _ops.predicted_sparse_mlp(x, w_up, b_up, w_down_t, b_down, indices, activation)[0]


# ---- autograd: each backward is itself a custom op ----

def _topk_activation_setup(ctx, inputs, output):
    h, k, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(h, output[1])


def _topk_activation_backward(ctx, grad_values, grad_indices):
    h, indices = ctx.saved_tensors
    if grad_values is None:
        return None, None, None
    return _ops.topk_activation_backward(grad_values, h, indices, ctx.activation), None, None


torch.library.register_autograd("leanformer::topk_activation", _topk_activation_backward,
                                setup_context=_topk_activation_setup)


def _sparse_down_projection_setup(ctx, inputs, output):
    values, indices, w_down_t, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(values, indices, w_down_t)


def _sparse_down_projection_backward(ctx, grad_y):
    values, indices, w_down_t = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
    gv, gw, gb = _ops.sparse_down_projection_backward(grad_y, values, indices, w_down_t, need)
    return (gv if need[0] else None, None, gw if need[1] else None, gb if need[2] else None)


torch.library.register_autograd("leanformer::sparse_down_projection", _sparse_down_projection_backward,
                                setup_context=_sparse_down_projection_setup)


def _topk_mlp_setup(ctx, inputs, output):
    x, w_up, b_up, w_down_t, b_down, k, activation = inputs
    ctx.activation = activation
    ctx.has_bias = (b_up is not None, b_down is not None)
    ctx.mark_non_differentiable(output[2])  # h_selected: saved for the backward, not a result
    ctx.save_for_backward(x, w_up, w_down_t, output[2], output[1])


def _topk_mlp_backward(ctx, grad_y, grad_indices, grad_h_selected):
    x, w_up, w_down_t, h_selected, indices = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], ctx.has_bias[0] and n[2], n[3], ctx.has_bias[1] and n[4]]
    if grad_y is None or not any(need):
        return (None,) * 7
    grads = _ops.topk_mlp_backward(grad_y, x, w_up, w_down_t, h_selected, indices, ctx.activation, need)
    return (*(g if m else None for g, m in zip(grads, need)), None, None)


torch.library.register_autograd("leanformer::topk_mlp", _topk_mlp_backward, setup_context=_topk_mlp_setup)


def _predicted_sparse_mlp_setup(ctx, inputs, output):
    x, w_up, b_up, w_down_t, b_down, indices, activation = inputs
    ctx.activation = activation
    ctx.has_bias = (b_up is not None, b_down is not None)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, w_up, w_down_t, output[1], indices)


def _predicted_sparse_mlp_backward(ctx, grad_y, grad_h_selected):
    # The same gradients as topk_mlp's (x, w_up, w_down_t, h_selected, indices saved alike).
    return _topk_mlp_backward(ctx, grad_y, None, grad_h_selected)


torch.library.register_autograd("leanformer::predicted_sparse_mlp", _predicted_sparse_mlp_backward,
                                setup_context=_predicted_sparse_mlp_setup)
