"""Intermediate layers of the project's models: one mechanism (per-layer hidden states, exits
through the shared final norm and head, hooks to skip, drop or patch a layer) in
:mod:`~leanformer.layers.stack`, and the methods built on it, one module each."""
from leanformer.layers.stack import (StackAdapter, adapter, attention_slots, check_layer, drop_modules, forward,
                                     head, num_layers, patch_layer, register_adapter, skip_layers,
                                     without_modules)
from leanformer.layers import adapters as _adapters  # noqa: F401  (registers the project's models)
from leanformer.layers.elastic_embeddings import ElasticEncoder, elastic_embedding
from leanformer.layers.matryoshka_2d import matryoshka_2d_loss, train_2dmse

__all__ = ["ElasticEncoder", "StackAdapter", "adapter", "attention_slots", "check_layer", "drop_modules",
           "elastic_embedding", "forward", "head", "matryoshka_2d_loss", "num_layers", "patch_layer",
           "register_adapter", "skip_layers", "train_2dmse", "without_modules"]
