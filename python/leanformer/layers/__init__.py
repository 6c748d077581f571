"""Intermediate layers of the project's models: one mechanism (per-layer hidden states, exits
through the shared final norm and head, hooks to skip, drop or patch a layer) in
:mod:`~leanformer.layers.stack`, and the methods built on it, one module each: SoFT
(:mod:`~leanformer.layers.sorted`), early exit (:mod:`~leanformer.layers.early_exit`),
LLM-Drop (:mod:`~leanformer.layers.drop`), the logit and tuned lens (:mod:`~leanformer.layers.lens`),
residual contributions (:mod:`~leanformer.layers.residual`), back-patching
(:mod:`~leanformer.layers.back_patching`), the shallow-exit drafter
(:mod:`~leanformer.layers.self_speculative`) and elastic embeddings / 2DMSE
(:mod:`~leanformer.layers.elastic_embeddings`, :mod:`~leanformer.layers.matryoshka_2d`).

Every method drives the layer-stack protocol the models implement themselves
(:class:`leanformer.models.LayerStack`); a model from outside takes part by subclassing it."""
from leanformer.layers.back_patching import back_patching
from leanformer.layers.drop import importance
from leanformer.layers.elastic_embeddings import ElasticEncoder, elastic_embedding
from leanformer.layers.lens import TunedLens, TunedLensLoss, lens_table
from leanformer.layers.matryoshka_2d import matryoshka_2d_loss, train_2dmse
from leanformer.layers.residual import contributions
from leanformer.layers.self_speculative import ShallowExitDrafter
from leanformer.layers.sorted import SortedLoss, exit_losses, exit_perplexities
from leanformer.layers.stack import (attention_slots, blocks, check_layer, drop_modules, forward, head, num_layers,
                                     patch_layer, skip_layers, without_modules)

__all__ = ["ElasticEncoder", "ShallowExitDrafter", "SortedLoss", "TunedLens", "TunedLensLoss", "attention_slots",
           "back_patching", "blocks", "check_layer", "contributions", "drop_modules", "elastic_embedding",
           "exit_losses", "exit_perplexities", "forward", "head", "importance", "lens_table", "matryoshka_2d_loss",
           "num_layers", "patch_layer", "skip_layers", "train_2dmse", "without_modules"]
