"""The intermediate-layer mechanism, on the layer-stack protocol the models implement
(:class:`leanformer.models.LayerStack`: ``embed -> blocks[0..L-1] -> final norm -> head``, each
block with its own cache slot). A model from outside takes part by subclassing it.

- :func:`forward`: ``exit_layer=l`` runs the first ``l`` blocks then the shared final norm and
  head; ``output_hidden_states=True`` also returns the ``l + 1`` hidden states (embeddings,
  then every block's output, as Hugging Face does);
- :func:`skip_layers`, :func:`patch_layer`, :func:`without_modules`: context managers that skip
  a block, rewrite its output, or remove attention / MLP sub-blocks, and leave nothing behind;
- :func:`drop_modules`: the permanent removal (LLM-Drop), with the cache slots remapped.

Hidden state ``i`` is the input of block ``i`` (the output of block ``i - 1``); exits go from 0
(the embeddings only) to ``L`` (the whole model). Every function takes the model itself or the
model inside a DistributedDataParallel wrapper.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from leanformer.models.protocol import SUBLAYERS, LayerStack, StandIn, real_block
from leanformer.models.protocol import check_layer as _check_layer

__all__ = ["SUBLAYERS", "attention_slots", "blocks", "check_layer", "drop_modules", "forward", "head", "num_layers",
           "patch_layer", "skip_layers", "stack", "unwrap", "without_modules"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def stack(model: nn.Module) -> LayerStack:
    """The :class:`~leanformer.models.LayerStack` ``model`` is (or wraps); TypeError otherwise."""
    inner = unwrap(model)
    if not isinstance(inner, LayerStack):
        raise TypeError(f"{type(inner).__name__} does not implement the layer-stack protocol "
                        "(leanformer.models.LayerStack): subclass it to use leanformer.layers")
    return inner


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, in order (whatever the model calls them)."""
    return stack(model).stack_blocks()


def num_layers(model: nn.Module) -> int:
    return len(blocks(model))


def check_layer(model: nn.Module, index: int, *, name: str = "layer", allow_end: bool = False) -> int:
    """``index`` if it is a block index (or, with ``allow_end``, an exit ``0..L``); otherwise an
    IndexError naming the argument, the index and the valid range."""
    return _check_layer(stack(model), index, name=name, allow_end=allow_end)


def forward(model: nn.Module, input_ids: Tensor, *, exit_layer: Optional[int] = None,
            output_hidden_states: bool = False, cache=None, **ctx) -> Union[Tensor, Tuple[Tensor, Tuple[Tensor, ...]]]:
    """The model's output after its first ``exit_layer`` blocks (all when None) and the shared
    final norm and head; with ``output_hidden_states`` also the hidden states ``0..exit_layer``
    (:meth:`~leanformer.models.LayerStack.stack_forward`).

    ``ctx``: the model's other per-call inputs (``mask`` for the LMs; ``attention_mask``,
    ``token_type_ids`` for BERT). A cache is updated by the blocks that run only.
    """
    return stack(model).stack_forward(input_ids, cache=cache, exit_layer=exit_layer,
                                      output_hidden_states=output_hidden_states, **ctx)


def head(model: nn.Module, hidden: Tensor, **ctx) -> Tensor:
    """The shared final norm and head on any hidden state (the logit lens)."""
    return stack(model).read_out(hidden, ctx)


class _SkippedBlock(StandIn):
    """Stands in for a block inside :func:`skip_layers`: the residual stream passes unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.skipped = [block]  # a list: not a submodule, so parameters() does not see it twice

    @property
    def wrapped(self) -> nn.Module:
        """The block it replaces (its sub-blocks and cache slot stay the model's)."""
        return self.skipped[0]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


def _indices(model: nn.Module, layers: Union[int, Sequence[int]], name: str) -> List[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    return sorted({check_layer(model, i, name=name) for i in layers})


@contextlib.contextmanager
def skip_layers(model: nn.Module, layers: Union[int, Sequence[int]]) -> Iterator[nn.Module]:
    """Within the block, the given blocks are skipped (their input is their output, their cache
    untouched), in the model's own forward and in :func:`forward` alike."""
    stack_ = blocks(model)
    idx = _indices(model, layers, "layer")
    saved = {i: stack_[i] for i in idx}
    try:
        for i in idx:
            stack_[i] = _SkippedBlock(saved[i])
        yield model
    finally:
        for i, block in saved.items():
            stack_[i] = block


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
    m = stack(model)
    plan = {"attention": _indices(model, attention, "attention layer"), "mlp": _indices(model, mlp, "mlp layer")}
    for kind, idx in plan.items():
        for i in idx:
            if m.sublayer(m.stack_blocks()[i], kind) is None:
                raise ValueError(f"the {kind} of layer {i} is already dropped")
    return plan


def drop_modules(model: nn.Module, attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> nn.Module:
    """Removes the attention sub-blocks of the layers in ``attention`` and the MLPs of those in
    ``mlp`` (LLM-Drop), in place; the residual stream passes those positions unchanged. A
    dropped attention has no cache slot any more: ``model.new_cache()`` makes one slot per
    remaining attention, and the model maps layers to slots
    (:meth:`~leanformer.models.LayerStack.attention_slots`). Returns ``model``."""
    m = stack(model)
    for kind, idx in _check_drop(model, attention, mlp).items():
        for i in idx:
            m.drop_sublayer(m.stack_blocks()[i], kind)
    return model


@contextlib.contextmanager
def without_modules(model: nn.Module, attention: Sequence[int] = (), mlp: Sequence[int] = ()) -> Iterator[nn.Module]:
    """:func:`drop_modules` for the duration of the block; the sub-blocks come back after it
    (a cache made inside belongs to the dropped model only)."""
    m = stack(model)
    removed = []
    try:
        for kind, idx in _check_drop(model, attention, mlp).items():
            for i in idx:
                block = real_block(m.stack_blocks()[i])
                removed.append((block, m.drop_sublayer(block, kind)))
        yield model
    finally:
        for block, attrs in reversed(removed):
            for name, module in attrs.items():
                setattr(block, name, module)


def attention_slots(model: nn.Module) -> List[Optional[int]]:
    """For every layer, the index of its cache slot (None where the attention was dropped)."""
    return stack(model).attention_slots()
