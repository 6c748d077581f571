"""The one protocol every model of the project follows for the intermediate-layer methods:
``embed -> blocks[0..L-1] -> final norm -> head``, each block with its own cache slot.

A model family takes part through a :class:`StackAdapter` (registered by ``model.model_type``)
that says how to run those pieces; the models themselves stay as they are. On top of it:

- :func:`forward`: ``exit_layer=l`` runs the first ``l`` blocks then the shared final norm and
  head; ``output_hidden_states=True`` also returns the ``L + 1`` hidden states (embeddings,
  then every block's output, as Hugging Face does);
- :func:`skip_layers`, :func:`patch_layer`, :func:`without_modules`: context managers that skip
  a block, rewrite its output, or remove attention / MLP sub-blocks, and leave nothing behind;
- :func:`drop_modules`: the permanent removal (LLM-Drop), with the cache slots remapped.

Hidden state ``i`` is the input of block ``i`` (the output of block ``i - 1``); exits go from 0
(the embeddings only) to ``L`` (the whole model).
"""
from __future__ import annotations

import abc
import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

SUBLAYERS = ("attention", "mlp")


class StackAdapter(abc.ABC):
    """How one model family maps onto the protocol (a family implements the abstract methods). ``ctx`` carries the per-call inputs other
    than the ids (padding mask, token types, ...) from :func:`forward` to every piece."""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def new_cache(self, model: nn.Module, batch: int, max_len: int):
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
        return model.new_cache()

    @abc.abstractmethod
    def embed(self, model: nn.Module, input_ids: Tensor, cache, ctx: dict) -> Tensor:
        raise NotImplementedError

    @abc.abstractmethod
    def block(self, model: nn.Module, i: int, x: Tensor, cache, ctx: dict) -> Tensor:
        """Block ``i`` on ``x``, updating its slot of ``cache`` (None: no cache)."""
        raise NotImplementedError

    @abc.abstractmethod
    def head(self, model: nn.Module, x: Tensor, ctx: dict) -> Tensor:
        """The shared final norm and head (the identity for an encoder without a head)."""
        raise NotImplementedError

    def finish(self, model: nn.Module, input_ids: Tensor, cache, ctx: dict) -> None:
        """After the blocks of one call: what the cache needs once per call (a length to advance)."""

    def fill_cache(self, model: nn.Module, i: int, x: Tensor, cache, ctx: dict) -> None:
        """Writes what block ``i`` would cache for input ``x`` without computing its output
        (early exit fills the skipped blocks' caches from the exit's hidden state)."""
        raise NotImplementedError(f"{type(model).__name__} has no incremental cache")

    @abc.abstractmethod
    def sublayer(self, block: nn.Module, kind: str) -> Optional[nn.Module]:
        """The attention or MLP sub-block of ``block`` (None once dropped); its output is what
        the block adds to the residual stream."""
        raise NotImplementedError

    @abc.abstractmethod
    def drop(self, block: nn.Module, kind: str) -> Dict[str, Optional[nn.Module]]:
        """Removes sub-block ``kind`` from ``block`` (with the norm only it used); returns the
        removed attributes so :func:`without_modules` can put them back."""
        raise NotImplementedError


_ADAPTERS: Dict[str, StackAdapter] = {}


def register_adapter(model_type: str, adapter: StackAdapter) -> None:
    """Makes models with ``model_type`` usable by every method of :mod:`leanformer.layers`."""
    _ADAPTERS[model_type] = adapter


def adapter(model: nn.Module) -> StackAdapter:
    model = unwrap(model)
    kind = getattr(model, "model_type", None)
    if kind not in _ADAPTERS:
        raise TypeError(f"{type(model).__name__} (model_type {kind!r}) has no layer-stack adapter; "
                        f"supported: {sorted(_ADAPTERS)} (leanformer.layers.register_adapter adds one)")
    return _ADAPTERS[kind]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, in order (whatever the model calls them)."""
    return adapter(model).blocks(unwrap(model))


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def check_layer(model: nn.Module, index: int, *, name: str = "layer", allow_end: bool = False) -> int:
    """``index`` if it is a block index (or, with ``allow_end``, an exit ``0..L``); otherwise an
    IndexError naming the argument, the index and the valid range."""
    L = num_layers(model)
    high = L if allow_end else L - 1
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= high:
        raise IndexError(f"{name} {index!r} is out of range: the model has {L} layers, valid {name}s are 0..{high}")
    return index


def forward(model: nn.Module, input_ids: Tensor, *, exit_layer: Optional[int] = None,
            output_hidden_states: bool = False, cache=None, **ctx) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, ...]]]:
    """The model's output after its first ``exit_layer`` blocks (all when None) and the shared
    final norm and head; with ``output_hidden_states`` also the hidden states ``0..exit_layer``.

    ``ctx``: the model's other per-call inputs (``mask`` for the LMs; ``attention_mask``,
    ``token_type_ids`` for BERT). A cache is updated by the blocks that run only.
    """
    a = adapter(model)
    model = unwrap(model)
    depth = num_layers(model) if exit_layer is None else check_layer(model, exit_layer, name="exit_layer",
                                                                      allow_end=True)
    x = a.embed(model, input_ids, cache, ctx)
    hidden = [x]
    for i in range(depth):
        x = a.block(model, i, x, cache, ctx)
        hidden.append(x)
    a.finish(model, input_ids, cache, ctx)
    out = a.head(model, x, ctx)
    return (out, tuple(hidden)) if output_hidden_states else out


def head(model: nn.Module, hidden: Tensor, **ctx) -> Tensor:
    """The shared final norm and head on any hidden state (the logit lens)."""
    return adapter(model).head(unwrap(model), hidden, ctx)


class _SkippedBlock(nn.Module):
    """Stands in for a block inside :func:`skip_layers`: the residual stream passes unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.skipped = [block]  # a list: not a submodule, so parameters() does not see it twice

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


def _real_block(model: nn.Module, i: int) -> nn.Module:
    """Block ``i``, seen through a :func:`skip_layers` stand-in."""
    block = blocks(model)[i]
    return block.skipped[0] if isinstance(block, _SkippedBlock) else block


def _indices(model: nn.Module, layers: Union[int, Sequence[int]], name: str) -> List[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    return sorted({check_layer(model, i, name=name) for i in layers})


@contextlib.contextmanager
def skip_layers(model: nn.Module, layers: Union[int, Sequence[int]]) -> Iterator[nn.Module]:
    """Within the block, the given blocks are skipped (their input is their output, their cache
    untouched), in the model's own forward and in :func:`forward` alike."""
    stack = blocks(model)
    idx = _indices(model, layers, "layer")
    saved = {i: stack[i] for i in idx}
    try:
        for i in idx:
            stack[i] = _SkippedBlock(saved[i])
        yield model
    finally:
        for i, block in saved.items():
            stack[i] = block


@contextlib.contextmanager
def patch_layer(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[nn.Module]:
    """Within the block, block ``layer``'s output ``y`` is replaced by ``fn(y)`` (what the next
    block and the head see), e.g. to write another layer's hidden state into it."""
    block = blocks(model)[check_layer(model, layer)]
    handle = block.register_forward_hook(lambda module, args, output: fn(output))
    try:
        yield model
    finally:
        handle.remove()


def _check_drop(model: nn.Module, attention: Sequence[int], mlp: Sequence[int]) -> Dict[str, List[int]]:
    a = adapter(model)
    plan = {"attention": _indices(model, attention, "attention layer"), "mlp": _indices(model, mlp, "mlp layer")}
    for kind, idx in plan.items():
        for i in idx:
            if a.sublayer(_real_block(model, i), kind) is None:
                raise ValueError(f"the {kind} of layer {i} is already dropped")
    return plan


def drop_modules(model: nn.Module, attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> nn.Module:
    """Removes the attention sub-blocks of the layers in ``attention`` and the MLPs of those in
    ``mlp`` (LLM-Drop), in place; the residual stream passes those positions unchanged. A
    dropped attention has no cache slot any more: ``model.new_cache()`` makes one slot per
    remaining attention, and the adapter maps layers to slots. Returns ``model``."""
    a = adapter(model)
    for kind, idx in _check_drop(model, attention, mlp).items():
        for i in idx:
            a.drop(_real_block(model, i), kind)
    return model


@contextlib.contextmanager
def without_modules(model: nn.Module, attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> Iterator[nn.Module]:
    """:func:`drop_modules` for the duration of the block; the sub-blocks come back after it
    (a cache made inside belongs to the dropped model only)."""
    a = adapter(model)
    removed = []
    try:
        for kind, idx in _check_drop(model, attention, mlp).items():
            for i in idx:
                block = _real_block(model, i)
                removed.append((block, a.drop(block, kind)))
        yield model
    finally:
        for block, attrs in reversed(removed):
            for name, module in attrs.items():
                setattr(block, name, module)


def attention_slots(model: nn.Module) -> List[Optional[int]]:
    """For every layer, the index of its cache slot (None where the attention was dropped)."""
    a = adapter(model)
    slots, n = [], 0
    for i in range(num_layers(model)):
        has = a.sublayer(_real_block(model, i), "attention") is not None
        slots.append(n if has else None)
        n += has
    return slots
