"""The layer-stack protocol every model family implements itself:
``embed -> blocks[0..L-1] -> final norm -> head``, each block with its own cache slot.

:class:`LayerStack` is what every model has (SLABLM and its softmax twin, LlamaLM,
BertEncoder): the pieces a family writes once (embed, run block ``i``, fill block ``i``'s
cache, final norm, head, sub-block access), and what is built on them once for all families
(:meth:`LayerStack.stack_forward`: an exit after ``l`` blocks and the hidden states,
:meth:`LayerStack.run_blocks`, :meth:`LayerStack.attention_slots`). :class:`CausalLM` adds
what decoding needs: a prefill of prompts of different lengths and a token tree's nodes run
over the cache. ``leanformer.layers`` and ``leanformer.decoding`` drive these methods and
nothing else, so a model from outside takes part in both by subclassing them.

Hidden state ``i`` is the input of block ``i`` (the output of block ``i - 1``); exits go from
0 (the embeddings only) to ``L`` (the whole model).

``ctx`` is a dict made once per call by :meth:`LayerStack.call_context` (or
:meth:`CausalLM.tree_context`) and read by every piece: whatever a block needs besides its
input and its cache slot (a padding mask, position ids, a token tree's ancestor mask, which
cache slot each block owns).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

from torch import Tensor, nn

SUBLAYERS = ("attention", "mlp")


def check_layer(model: "LayerStack", index: int, *, name: str = "layer", allow_end: bool = False) -> int:
    """``index`` if it is a block index of ``model`` (or, with ``allow_end``, an exit ``0..L``);
    otherwise an IndexError naming the argument, the index and the valid range."""
    L = len(model.stack_blocks())
    high = L if allow_end else L - 1
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= high:
        raise IndexError(f"{name} {index!r} is out of range: the model has {L} layers, valid {name}s are 0..{high}")
    return index


class StandIn(nn.Module):
    """Base of a module that temporarily takes a block's place in the stack (e.g.
    ``leanformer.layers.skip_layers``): ``wrapped`` is the block it replaces, whose sub-blocks
    and cache slot stay the model's."""

    wrapped: nn.Module


def real_block(block: nn.Module) -> nn.Module:
    """``block``, or the block a :class:`StandIn` replaces."""
    return block.wrapped if isinstance(block, StandIn) else block


class LayerStack(nn.Module):
    """Base class of a model that is ``embed -> blocks -> final norm -> head``.

    A family implements :meth:`embed_tokens`, :meth:`run_block` and, where they differ from the
    defaults, :meth:`stack_blocks` (``self.blocks``), :meth:`call_context`,
    :meth:`final_norm` (identity), :meth:`apply_head` (identity: an encoder without a head),
    :meth:`fill_block_cache`, :meth:`finish_call`, :meth:`new_cache` and
    :attr:`sublayer_attrs`. Its ``forward`` then validates its inputs and returns
    :meth:`stack_forward`, which implements ``exit_layer`` and ``output_hidden_states`` for
    every family.
    """

    #: per sub-block kind, the block's attributes it consists of: the norm only it reads, then
    #: the sub-block itself (whose output is what the block adds to the residual stream).
    #: :meth:`drop_sublayer` sets both to None; a block's forward skips a sub-block that is None.
    sublayer_attrs: Dict[str, Tuple[str, str]] = {"attention": ("norm1", "attn"), "mlp": ("norm2", "mlp")}

    # ---- what a family implements ----

    def stack_blocks(self) -> nn.ModuleList:
        """The blocks, in order (whatever the model calls them)."""
        return self.blocks

    def call_context(self, input_ids: Tensor, cache=None, **inputs) -> dict:
        """The per-call context every piece reads (``inputs``: the model's other per-call
        inputs, e.g. ``mask``; a family adds what it derives from them once, e.g. positions).
        Raises ValueError on a cache that does not fit the model."""
        return dict(inputs)

    def embed_tokens(self, input_ids: Tensor, ctx: dict) -> Tensor:
        """``input_ids [B, T]`` (int64) -> hidden state 0, ``[B, T, C]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed_tokens")

    def run_block(self, i: int, x: Tensor, cache, ctx: dict) -> Tensor:
        """Block ``i`` on ``x [B, T, C]``, updating its slot of ``cache`` (None: no cache). Calls
        the block module itself, so hooks on it and stand-ins for it take effect."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_block")

    def fill_block_cache(self, i: int, x: Tensor, cache, ctx: dict) -> None:
        """Writes what block ``i`` would cache for input ``x`` without computing its output
        (early exit fills the skipped blocks' caches from the exit's hidden state)."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental cache")

    def finish_call(self, cache, ctx: dict) -> None:
        """After the blocks of one call: what the cache needs once per call (a length to advance)."""

    def final_norm(self, x: Tensor, ctx: Optional[dict] = None) -> Tensor:
        """The final norm shared by every exit (identity by default)."""
        return x

    def apply_head(self, h: Tensor) -> Tensor:
        """The head on a final-normed hidden state (identity by default: an encoder's output is
        its hidden state)."""
        return h

    def new_cache(self, batch: int, max_len: Optional[int] = None):
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental cache")

    # ---- built on them, once for every family ----

    def read_out(self, x: Tensor, ctx: Optional[dict] = None) -> Tensor:
        """The shared final norm and head on any hidden state (the logit lens)."""
        return self.apply_head(self.final_norm(x, ctx))

    def run_blocks(self, x: Tensor, cache, ctx: dict, start: int = 0, stop: Optional[int] = None,
                   hidden: Optional[List[Tensor]] = None) -> Tensor:
        """``x`` through blocks ``start..stop - 1`` (all from ``start`` when ``stop`` is None);
        each output is appended to ``hidden`` when given. Does not call :meth:`finish_call`."""
        for i in range(start, len(self.stack_blocks()) if stop is None else stop):
            x = self.run_block(i, x, cache, ctx)
            if hidden is not None:
                hidden.append(x)
        return x

    def stack_forward(self, input_ids: Tensor, *, cache=None, exit_layer: Optional[int] = None,
                      output_hidden_states: bool = False, return_hidden: bool = False,
                      **inputs) -> Union[Tensor, Tuple[Tensor, Tensor], Tuple[Tensor, Tuple[Tensor, ...]]]:
        """The output after the first ``exit_layer`` blocks (all when None) and the shared final
        norm and head. ``output_hidden_states``: ``(out, hidden_states)``, the ``exit_layer + 1``
        hidden states (the embeddings, then every block's output, as Hugging Face returns them);
        ``return_hidden``: ``(out, h)``, ``h`` the final-normed hidden state the head read
        (what drafters read). A cache is updated by the blocks that run only. ``inputs``: the
        model's other per-call inputs (see :meth:`call_context`)."""
        if return_hidden and output_hidden_states:
            raise ValueError("return_hidden and output_hidden_states do not go together")
        depth = None if exit_layer is None else check_layer(self, exit_layer, name="exit_layer", allow_end=True)
        ctx = self.call_context(input_ids, cache, **inputs)
        x = self.embed_tokens(input_ids, ctx)
        hidden = [x] if output_hidden_states else None
        x = self.run_blocks(x, cache, ctx, 0, depth, hidden)
        self.finish_call(cache, ctx)
        h = self.final_norm(x, ctx)
        out = self.apply_head(h)
        if return_hidden:
            return out, h
        return (out, tuple(hidden)) if output_hidden_states else out

    def stack_fill(self, input_ids: Tensor, *, cache, **inputs) -> None:
        """:meth:`stack_forward`'s blocks and cache update without the final norm and head: a
        prefill, whose logits nobody reads (a 49152-token head at every prompt row is a fifth of
        SmolLM2-135M's multiply-adds)."""
        ctx = self.call_context(input_ids, cache, **inputs)
        self.run_blocks(self.embed_tokens(input_ids, ctx), cache, ctx)
        self.finish_call(cache, ctx)

    def sublayer(self, block: nn.Module, kind: str) -> Optional[nn.Module]:
        """The ``kind`` ("attention" or "mlp") sub-block of ``block`` (None once dropped)."""
        return getattr(real_block(block), self.sublayer_attrs[kind][-1], None)

    def drop_sublayer(self, block: nn.Module, kind: str) -> Dict[str, Optional[nn.Module]]:
        """Removes sub-block ``kind`` from ``block`` with the norm only it reads; returns the
        removed attributes (setting them back restores the block)."""
        block = real_block(block)
        removed = {name: getattr(block, name) for name in self.sublayer_attrs[kind]}
        for name in removed:
            setattr(block, name, None)
        return removed

    def attention_slots(self) -> List[Optional[int]]:
        """For every block, the index of its cache slot (None where its attention was dropped):
        a cache holds one slot per remaining attention."""
        slots, n = [], 0
        for block in self.stack_blocks():
            has = self.sublayer(block, "attention") is not None
            slots.append(n if has else None)
            n += has
        return slots


class CausalLM(LayerStack):
    """A :class:`LayerStack` language model that decodes: what ``leanformer.generate`` and the
    drafters need besides the stack.

    A family implements :meth:`new_cache`, :meth:`prefill` and :meth:`tree_context` (and its
    :meth:`run_block` honours the tree context). Its cache has ``commit(accepted,
    num_accepted)``, keeping a verified tree's accepted path (as plain decoding of those tokens
    would have left the cache), and ``select(rows)``, keeping the sequences ``rows`` only.
    """

    def prefill(self, cache, input_ids: Tensor, lengths: Tensor) -> None:
        """Runs right-padded prompts ``input_ids [B, P]`` with ``lengths [B]`` (each 0..P) into
        ``cache``; each sequence's cache then holds its own prompt only."""
        raise NotImplementedError(f"{type(self).__name__} must implement prefill")

    def tree_context(self, cache, mask: Tensor, depths: Tensor, parents: Tensor) -> dict:
        """The context of a token tree's nodes over the prefix in ``cache``: ``mask [B, T, T]``
        (bool, ``[i, j]`` iff j is i or an ancestor of i), ``depths`` and ``parents [B, T]``
        (int64; node i sits at position ``prefix length + depths[i]``). Blocks run under it read
        the cache without advancing it and keep what :meth:`commit` needs; ``cache`` None (where
        the family allows it) is a tree without a prefix, for training."""
        raise NotImplementedError(f"{type(self).__name__} has no token-tree forward")

    def tree_logits(self, cache, tokens: Tensor, mask: Tensor, depths: Tensor,
                    parents: Tensor) -> Tuple[Tensor, Tensor]:
        """A token tree's nodes ``tokens [B, T]`` through every block over ``cache``:
        ``(logits [B, T, V], final-normed hidden states [B, T, C])``."""
        ctx = self.tree_context(cache, mask, depths, parents)
        h = self.final_norm(self.run_blocks(self.embed_tokens(tokens, ctx), cache, ctx), ctx)
        return self.apply_head(h), h

