"""Plain-PyTorch references of every kernel's math, shared by the tests and the benchmarks."""
from leanformer.reference.linear_attention import (
    sla_causal_chunked_reference,
    sla_causal_quadratic_reference,
    sla_noncausal_reference,
    sla_step_reference,
)

__all__ = [
    "sla_causal_chunked_reference",
    "sla_causal_quadratic_reference",
    "sla_noncausal_reference",
    "sla_step_reference",
]
