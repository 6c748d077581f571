"""Training scripts of the project's models on real data (`leanformer train ...`)."""
