"""Training scripts of the project's models on real data: ``leanformer train NAME`` or
``python -m leanformer.lab.train.MODULE``; each writes its result (``<--out>/<kind>-<machine
class>.json`` and a plot) through :mod:`leanformer.lab.results`."""
