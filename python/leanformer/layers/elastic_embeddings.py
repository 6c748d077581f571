"""Elastic sentence embeddings (2D Matryoshka Sentence Embeddings, Li et al. 2024): from a
BERT sentence encoder such as the real all-MiniLM-L6-v2, the embedding of any layer ``l``
(1..L) at any leading dimension count ``d`` (1..D): mean pooling of layer ``l``'s hidden
states over the real tokens, truncated to its first ``d`` dimensions, then L2-normalized.
Layer L at D dimensions is the encoder's own sentence embedding.

Example::

    >>> elastic = ElasticEncoder(load_minilm())
    >>> elastic.encode(["A man plays a guitar."], layer=3, dim=128).shape
    torch.Size([1, 128])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from leanformer.layers.stack import forward as stack_forward
from leanformer.models.bert import SentenceEncoder, mean_pool


def check_layer(layer: int, num_layers: int) -> int:
    """``layer`` as an index into the hidden states (1 = the first block's output); anything
    but an int in 1..num_layers raises ValueError naming it."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be an int in 1..{num_layers} (the encoder's blocks), got {layer!r}")
    return layer


def check_dim(dim: int, hidden_size: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= hidden_size:
        raise ValueError(f"dim must be an int in 1..{hidden_size} (the hidden size), got {dim!r}")
    return dim


def elastic_embedding(pooled: Tensor, dim: int) -> Tensor:
    """The first ``dim`` dimensions of ``pooled [..., D]``, L2-normalized: truncation comes
    before normalization, so every (layer, dim) embedding is a unit vector."""
    check_dim(dim, pooled.shape[-1])
    return nn.functional.normalize(pooled[..., :dim], p=2, dim=-1)


class ElasticEncoder(nn.Module):
    """A :class:`~leanformer.models.SentenceEncoder` (mean pooling) read at any layer and any
    leading dimension count. It holds the encoder itself (no copy): fine-tuning it fine-tunes
    the wrapped model.

    ``forward(input_ids, attention_mask, token_type_ids=None, *, layers)`` -> the mean-pooled,
    not yet truncated nor normalized hidden states of those layers, ``[len(layers), B, D]``
    (the form the 2DMSE objective and DistributedDataParallel work with); the blocks after the
    deepest of them do not run (an exit of :func:`leanformer.layers.forward`);
    :meth:`embed` gives one (layer, dim) embedding, :meth:`encode` takes sentences.
    """

    def __init__(self, model: SentenceEncoder):
        super().__init__()
        self.model = model

    @property
    def num_layers(self) -> int:
        return self.model.encoder.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.encoder.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None, *,
                layers: Sequence[int]) -> Tensor:
        layers = [check_layer(l, self.num_layers) for l in layers]
        if not layers:
            raise ValueError("layers is empty")
        _, hidden = stack_forward(self.model.encoder, input_ids, exit_layer=max(layers), output_hidden_states=True,
                                  attention_mask=attention_mask, token_type_ids=token_type_ids)
        return torch.stack([mean_pool(hidden[l], attention_mask) for l in layers])

    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None, *,
              layer: Optional[int] = None, dim: Optional[int] = None) -> Tensor:
        """The ``[B, dim]`` unit embeddings of ``layer`` (default: the last) truncated to ``dim``
        (default: all) dimensions."""
        layer = self.num_layers if layer is None else layer
        dim = check_dim(self.hidden_size if dim is None else dim, self.hidden_size)
        return elastic_embedding(self(input_ids, attention_mask, token_type_ids, layers=[layer])[0], dim)

    @torch.no_grad()
    def pooled_layers(self, sentences: Sequence[str], *, layers: Optional[Sequence[int]] = None,
                      batch_size: int = 32) -> Tensor:
        """The mean-pooled hidden states of the sentences at ``layers`` (default: every layer,
        1..L), ``[len(layers), N, D]`` (float32, CPU, in the sentences' order): one forward per
        batch gives every (layer, dim) embedding through :func:`elastic_embedding`. Batched by
        length, as ``SentenceEncoder.encode``."""
        if isinstance(sentences, str):
            raise TypeError("pooled_layers takes a list of sentences, not a str")
        layers = range(1, self.num_layers + 1) if layers is None else layers
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(layers), len(sentences), self.hidden_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in self.model.tokenizer([sentences[i] for i in idx]).items()}
            out[:, idx] = self(**batch, layers=layers).float().cpu()
        return out

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, layer: Optional[int] = None, dim: Optional[int] = None,
               batch_size: int = 32) -> Tensor:
        """The ``[N, dim]`` unit embeddings of the sentences at ``layer`` and ``dim`` (defaults:
        the last layer, every dimension: the wrapped model's own embedding)."""
        layer = check_layer(self.num_layers if layer is None else layer, self.num_layers)
        dim = check_dim(self.hidden_size if dim is None else dim, self.hidden_size)
        return elastic_embedding(self.pooled_layers(sentences, layers=[layer], batch_size=batch_size)[0], dim)
