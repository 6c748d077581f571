"""Folding RepBN/PRepBN into the neighbouring Linear for inference (SLAB).

In eval a RepBN is a per-channel affine map, ``y = x * a + b`` with
``a = bn_w / sqrt(var + eps) + alpha`` and ``b = bn_b - bn_w * mean / sqrt(var + eps)``, so it
folds into the Linear it feeds (``W' = W diag(a)``, ``bias' = W b + bias``) or, for a norm
with no Linear after it, into the Linear that produces its input (``W' = diag(a) W``,
``bias' = a * bias + b``). The folded model has no normalization op left.

Which Linear is adjacent comes from the model: consecutive entries of an ``nn.Sequential``,
or a module's ``fold_pairs()`` returning ``(norm_name, [linear_names], "forward" | "backward")``
with names relative to that module.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import nn

from leanformer.nn.rep_batchnorm import PRepBN, RepBN

NORMS = (RepBN, PRepBN)


def _affine(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    bn = norm.bn if isinstance(norm, PRepBN) else norm
    if bn.num_batches_tracked.item() == 0:
        raise ValueError("has no running statistics (never trained): there is nothing to fold")
    invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
    w = bn.weight.double()
    return w * invstd + bn.alpha.double(), bn.bias.double() - w * bn.running_mean.double() * invstd


def _sequential_pairs(seq: nn.Sequential) -> List[Tuple[str, List[str], str]]:
    names = list(seq._modules)
    pairs = []
    for i, name in enumerate(names):
        if isinstance(seq[i], NORMS):
            if i + 1 < len(names) and isinstance(seq[i + 1], nn.Linear):
                pairs.append((name, [names[i + 1]], "forward"))
            elif i > 0 and isinstance(seq[i - 1], nn.Linear):
                pairs.append((name, [names[i - 1]], "backward"))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Returns ``model`` (a copy unless ``inplace``) with every RepBN/PRepBN folded into its
    adjacent Linear and replaced by ``nn.Identity``; the model is put in eval mode. Raises
    ValueError naming the norm it cannot fold, and why."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    folded = set()
    for owner_name, owner in list(model.named_modules()):
        if hasattr(owner, "fold_pairs"):
            pairs = owner.fold_pairs()
        elif isinstance(owner, nn.Sequential):
            pairs = _sequential_pairs(owner)
        else:
            continue
        for norm_name, linear_names, direction in pairs:
            where = f"{owner_name}.{norm_name}" if owner_name else norm_name
            norm = owner.get_submodule(norm_name)
            if not isinstance(norm, NORMS):
                raise ValueError(f"cannot fold {where}: it is a {type(norm).__name__}, not RepBN/PRepBN")
            try:
                a, b = _affine(norm)
            except ValueError as e:
                raise ValueError(f"cannot fold {where}: {e}") from None
            for lin_name in linear_names:
                lin = owner.get_submodule(lin_name)
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"cannot fold {where} into {lin_name}: it is a {type(lin).__name__}, not nn.Linear")
                W = lin.weight.double()
                bias = lin.bias.double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
                if direction == "forward":
                    new_w, new_b = W * a, W @ b + bias
                elif direction == "backward":
                    new_w, new_b = a[:, None] * W, a * bias + b
                else:
                    raise ValueError(f"cannot fold {where}: direction must be 'forward' or 'backward', got {direction!r}")
                # New parameters rather than in-place copies: a weight tied to another module
                # (an LM head tied to the embedding) is untied instead of corrupting the other.
                lin.weight = nn.Parameter(new_w.to(lin.weight.dtype), lin.weight.requires_grad)
                lin.bias = nn.Parameter(new_b.to(lin.weight.dtype), lin.weight.requires_grad)
            parent_name, _, attr = norm_name.rpartition(".")
            setattr(owner.get_submodule(parent_name) if parent_name else owner, attr, nn.Identity())
            folded.add(where)
    left = [name for name, m in model.named_modules() if isinstance(m, NORMS)]
    if left:
        raise ValueError(f"cannot fold {left[0]}: no adjacent Linear is declared for it (put it next to "
                         "an nn.Linear in an nn.Sequential, or list it in its parent's fold_pairs())")
    return model
