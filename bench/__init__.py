"""leanformer's microbenchmark suite: every op against its baselines, timed in one run."""
