"""Experiments on real models and data that reproduce the papers' measurements
(`leanformer experiment NAME`)."""
