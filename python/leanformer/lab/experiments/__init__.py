"""Experiments on real models and data that reproduce the papers' measurements
(``leanformer experiment NAME``) and the intermediate-layer analyses (``leanformer layers NAME``,
the ``layers_*`` modules); each also runs as ``python -m leanformer.lab.experiments.MODULE`` and
writes its result through :mod:`leanformer.lab.results`."""
