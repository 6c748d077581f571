"""Intermediate layers of the project's models: one mechanism (per-layer hidden states, exits
through the shared final norm and head, hooks to skip, drop or patch a layer) in
:mod:`~leanformer.layers.stack`, and the methods built on it, one module each: SoFT
(:mod:`~leanformer.layers.sorted`), early exit (:mod:`~leanformer.layers.early_exit`),
LLM-Drop (:mod:`~leanformer.layers.drop`), the logit and tuned lens (:mod:`~leanformer.layers.lens`),
residual contributions (:mod:`~leanformer.layers.residual`), back-patching
(:mod:`~leanformer.layers.back_patching`), the shallow-exit drafter
(:mod:`~leanformer.layers.self_speculative`) and elastic embeddings / 2DMSE
(:mod:`~leanformer.layers.elastic_embeddings`, :mod:`~leanformer.layers.matryoshka_2d`)."""
from leanformer.layers.stack import (StackAdapter, adapter, attention_slots, blocks, check_layer, drop_modules,
                                     forward, head, num_layers, patch_layer, register_adapter, skip_layers,
                                     without_modules)
from leanformer.layers import adapters as _adapters  # noqa: F401,E402  (registers the project's models)
from leanformer.layers.back_patching import back_patching  # noqa: E402
from leanformer.layers.drop import importance  # noqa: E402
from leanformer.layers.elastic_embeddings import ElasticEncoder, elastic_embedding  # noqa: E402
from leanformer.layers.lens import TunedLens, TunedLensLoss, lens_table  # noqa: E402
from leanformer.layers.matryoshka_2d import matryoshka_2d_loss, train_2dmse  # noqa: E402
from leanformer.layers.residual import contributions  # noqa: E402
from leanformer.layers.self_speculative import ShallowExitDrafter  # noqa: E402
from leanformer.layers.sorted import SortedLoss, exit_losses, exit_perplexities  # noqa: E402

__all__ = ["ElasticEncoder", "ShallowExitDrafter", "SortedLoss", "StackAdapter", "TunedLens", "TunedLensLoss",
           "adapter", "attention_slots", "back_patching", "blocks", "check_layer", "contributions", "drop_modules",
           "elastic_embedding", "exit_losses", "exit_perplexities", "forward", "head", "importance", "lens_table",
           "matryoshka_2d_loss", "num_layers", "patch_layer", "register_adapter", "skip_layers", "train_2dmse",
           "without_modules"]
