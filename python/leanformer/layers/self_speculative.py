"""Self-speculative decoding with a shallow exit (the drafter of Sorted LLaMA's SoFT models and
of LayerSkip): the first ``exit_layer`` layers of the model itself, read out by its shared final
norm and head, draft the next tokens one by one; :func:`leanformer.generate` verifies them with
the whole model. The drafter reuses the verified cache of those layers (a SoFT-trained model's
sub-model is the same weights), so it costs ``exit_layer / L`` of a step per drafted token and
no extra parameters."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from leanformer.layers.stack import check_layer, num_layers, stack
from leanformer.models import KVCache, LMCache
from leanformer.nn import SLACache


class ShallowExitDrafter:
    """A drafter for :func:`leanformer.generate` (the interface of
    :class:`~leanformer.decoding.MedusaHeads`: ``num_future``, ``model``, ``tree_forward``,
    ``draft``) drafting ``num_future`` tokens with the sub-model of the first ``exit_layer``
    layers of a :class:`~leanformer.models.CausalLM`.

    The drafted chain starts from the greedy token of the last accepted node (what greedy
    verification appends); with sampling, a different sampled token only lowers acceptance.
    Drafting runs ``num_future`` one-token forwards of the sub-model, so it pays off when
    ``exit_layer / L`` is small and the sub-model agrees with the whole model often (a
    SoFT-trained model).

    Example::

        >>> drafter = ShallowExitDrafter(model, exit_layer=2, num_future=3)
        >>> out = leanformer.generate(model, ids, max_new_tokens=64, drafter=drafter)
        >>> out.tokens_per_forward   # the mean accepted length (bonus token included)
    """

    def __init__(self, model, exit_layer: int, num_future: int):
        if num_future < 1:
            raise ValueError(f"num_future must be >= 1, got {num_future}")
        L = num_layers(model)
        if check_layer(model, exit_layer, name="exit_layer", allow_end=True) in (0, L):
            raise ValueError(f"exit_layer must be a shallow exit in 1..{L - 1}, got {exit_layer}")
        self.model, self.exit_layer, self.num_future = model, exit_layer, num_future
        self._cache = None

    def tree_forward(self, cache, tree) -> Tuple[Tensor, Tensor]:
        """The verifying forward of ``tree`` over ``cache``: ``(logits [B, T, V], final-normed
        hidden states [B, T, C])``; :meth:`draft` continues from the cache it verified into."""
        self._cache = cache
        return stack(self.model).tree_logits(cache, tree.tokens.clamp(min=0), tree.mask, tree.depths, tree.parents)

    @torch.no_grad()
    def draft(self, features: Tensor, node: Tensor) -> Tensor:
        """Draft logits ``[B, num_future, V]``: offset k is the sub-model's prediction of the token
        ``k + 2`` places after the accepted node ``node [B]``."""
        model = stack(self.model)
        rows = torch.arange(features.shape[0], device=node.device)
        token = model.apply_head(features[rows, node]).argmax(-1)
        cache, restore = self._scratch_cache(model)
        drafts = []
        try:
            for _ in range(self.num_future):
                logits = model.stack_forward(token[:, None], exit_layer=self.exit_layer, cache=cache)[:, -1]
                drafts.append(logits)
                token = logits.argmax(-1)
        finally:
            restore()
        return torch.stack(drafts, 1)

    def _scratch_cache(self, model):
        """A cache whose first ``exit_layer`` layers continue the verified one, and how to leave
        the verified one as it was afterwards."""
        cache = self._cache
        if isinstance(cache, KVCache):  # drafts go to scratch slots past lens
            lens = cache.lens.clone()

            def restore():
                cache.lens = lens
            return cache, restore
        if not isinstance(cache, LMCache):
            raise TypeError(f"ShallowExitDrafter drafts over a KVCache or an LMCache, got {type(cache).__name__}")
        n = sum(s is not None for s in model.attention_slots()[:self.exit_layer])  # the sub-model's slots
        layers = [SLACache(tuple(t.clone() for t in c.state) if c.state is not None else None,
                           None if c.conv_tail is None else c.conv_tail.clone(), c.length)
                  for c in cache.layers[:n]]
        return LMCache(layers + [SLACache() for _ in cache.layers[n:]]), lambda: None
