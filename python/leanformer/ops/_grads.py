"""Backward through a PyTorch reference, for the ops whose gradient is rarely needed (training
drafters through a token tree) and not worth a kernel of its own."""
from __future__ import annotations

import torch


def grads_through(reference, diff_inputs, needs, grad_o, *rest_args):
    """Gradients of ``reference(*diff_inputs, ...)`` for the inputs whose ``needs`` is set."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(diff_inputs, needs)]
        o = reference(*leaves, *rest_args)
        wanted = [x for x in leaves if x.requires_grad]
        got = iter(torch.autograd.grad(o, wanted, grad_o) if wanted else [])
    return [next(got) if x.requires_grad else None for x in leaves]
