"""Switching a compressed model between its DenseSparseLinear layers (inference, packed) and
StraightThroughFactorizer layers (training D and S jointly), in place."""
from __future__ import annotations

from typing import List

from torch import nn

from leanformer.compress.selection import replace_module
from leanformer.nn.dense_sparse_linear import DenseSparseLinear
from leanformer.nn.straight_through_factorizer import StraightThroughFactorizer


def to_straight_through(model: nn.Module) -> List[str]:
    """Every DenseSparseLinear of ``model`` becomes a StraightThroughFactorizer (same forward);
    returns their names."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, DenseSparseLinear)]
    for name in names:
        replace_module(model, name, StraightThroughFactorizer.from_dense_sparse(model.get_submodule(name)))
    return names


def finalize_straight_through(model: nn.Module) -> List[str]:
    """Every StraightThroughFactorizer of ``model`` is packed back into a DenseSparseLinear with
    its current pattern; returns their names."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, StraightThroughFactorizer)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).finalize())
    return names
