"""Which nn.Linear layers of a model a compression pass replaces, and replacing them."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, List, Optional, Tuple, Union

from torch import nn

logger = logging.getLogger(__name__)

# Default: every Linear except embeddings and output heads (whose compression hurts most and
# which tie to the vocabulary), recognized by these words in a module's dotted name.
EXCLUDED_WORDS = ("embed", "head", "classifier", "pooler")

Modules = Optional[Union[Iterable[str], Callable[[str, nn.Linear], bool]]]


def select_linears(model: nn.Module, modules: Modules = None, *, multiple_of: int = 1) -> List[Tuple[str, nn.Linear]]:
    """``(name, linear)`` for the layers to replace.

    ``modules``: None (every nn.Linear whose name has none of ``EXCLUDED_WORDS``; one whose
    in_features is not a multiple of ``multiple_of`` is skipped, with a logged warning), names
    (each must be an nn.Linear of the model, in_features a multiple of ``multiple_of``), or a
    predicate ``(name, linear) -> bool``."""
    linears = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    if modules is None:
        chosen = []
        for name, mod in linears:
            if any(w in name.lower() for w in EXCLUDED_WORDS):
                continue
            if mod.in_features % multiple_of:
                logger.warning("skipping %s: in_features=%d is not a multiple of %d (it stays dense)", name,
                               mod.in_features, multiple_of)
                continue
            chosen.append((name, mod))
    elif callable(modules):
        chosen = [(name, mod) for name, mod in linears if modules(name, mod)]
    else:
        by_name = dict(model.named_modules())
        chosen = []
        for name in modules:
            if not isinstance(by_name.get(name), nn.Linear):
                found = "not found" if name not in by_name else f"a {type(by_name[name]).__name__}"
                raise ValueError(f"modules: {name!r} must name an nn.Linear of the model, it is {found}")
            chosen.append((name, by_name[name]))
    for name, mod in chosen:
        if mod.in_features % multiple_of:
            raise ValueError(f"modules: {name} has in_features={mod.in_features}, not a multiple of {multiple_of}")
    if not chosen:
        raise ValueError("no nn.Linear layer to compress was selected")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def value_bits(linear: nn.Linear) -> int:
    return linear.weight.element_size() * 8


def check_compression(compression: float) -> None:
    if not compression > 1:
        raise ValueError(f"compression must be > 1 (dense storage / compressed storage), got {compression}")
